"""The four grouped GEMMs of one 26B-A4B experts layer, one at a time, side by side.

Where bench/moe_experts.py times the whole layer (routing, activation and combining
included), this isolates the products: gate_up and down forward (x @ W_e^T) and their
input-gradient products in backward (dy @ W_e), with the routing of `--tokens` tokens,
top-8 of 128 experts. Per GEMM: BF16 grouped_mm on BF16 weights, the fused 4-bit kernel,
and dequantize-the-layer-then-grouped_mm, median ms and ratio to BF16.

    python bench/experts_gemm.py --tokens 512 2048 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_timing import fused_kernel_configs, median_ms

from patches.inject.experts_4bit import (
    _grouped_mm,
    _plain_absmax,
    dequantize_all,
    pack_experts,
    route,
)
from patches.inject.experts_4bit_triton import grouped_gemm_4bit

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 128, 2816, 704, 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = {
        "gate_up": torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda") * 0.02,
        "down": torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda") * 0.02,
    }
    weights = {name: w.to(torch.bfloat16) for name, w in weights.items()}
    packed = {name: pack_experts(w) for name, w in weights.items()}

    print("| tokens | GEMM | bf16 grouped ms | fused 4-bit ms | dequantize+grouped ms | fused × |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        probs = torch.randn(tokens, EXPERTS, device="cuda").softmax(-1)
        _, offsets = route(torch.topk(probs, TOP_K).indices, EXPERTS)
        rows = tokens * TOP_K
        for name, transpose in (
            ("gate_up", False),
            ("down", False),
            ("gate_up", True),
            ("down", True),
        ):
            w, p = weights[name], packed[name]
            absmax = _plain_absmax(p)
            in_features = w.shape[1] if transpose else w.shape[2]
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            dense = w if transpose else w.transpose(-2, -1)

            def bf16(x=x, dense=dense, offsets=offsets) -> object:
                return _grouped_mm(x, dense, offsets)

            def fused(x=x, p=p, absmax=absmax, transpose=transpose, offsets=offsets) -> object:
                return grouped_gemm_4bit(x, offsets, p.data, absmax, p.state, transpose)

            def dequantized(x=x, p=p, transpose=transpose, offsets=offsets) -> object:
                full = dequantize_all(p)
                return _grouped_mm(x, full if transpose else full.transpose(-2, -1), offsets)

            times = [median_ms(fn, args.repeats) for fn in (bf16, fused, dequantized)]
            label = f"{name} {'backward (dy @ W)' if transpose else 'forward (x @ W^T)'}"
            print(
                f"| {tokens} | {label} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | "
                f"{times[1] / times[0]:.2f} |"
            )
    for name, config in fused_kernel_configs().items():
        print(f"{name}: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
