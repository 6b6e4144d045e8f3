"""The fused 4-bit GEMM against dequantize-then-grouped_mm on a real model's routing.

bench/moe_experts.py routes tokens uniformly at random. This loads a Gemma 4 MoE checkpoint
with load_in_4bit on a transformers patched by stackpatch (P13), runs one forward and
backward over `--tokens` tokens, records the routing (rows per expert) of every grouped
4-bit GEMM the model runs, then times both kernels on each recorded routing with the
layer's shapes, side by side. Prints how skewed the routing is and the time ratio.

    python bench/experts_routing.py --model /tmp/ckpt-26b --tokens 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_timing import median_ms

from patches.inject.experts_4bit import (
    _grouped_linear_4bit,
    _plain_absmax,
    pack_experts,
)
from patches.inject.experts_4bit_triton import grouped_gemm_4bit


def record_routing(model_dir: str, tokens: int) -> list[tuple[torch.Tensor, tuple, bool]]:
    import transformers.integrations.bitsandbytes as integration
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not hasattr(integration, "grouped_gemm_4bit"):
        raise SystemExit("transformers is not patched with P13's fused kernel: apply it first")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        ),
        dtype=torch.bfloat16,
        device_map="cuda",
    )
    calls = []
    fused = integration.grouped_gemm_4bit

    def spy(x, ends, packed, absmax, state, transpose, blocks=None):
        calls.append((ends.detach().clone(), tuple(state.shape), transpose))
        return fused(x, ends, packed, absmax, state, transpose, blocks)

    integration.grouped_gemm_4bit = spy
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    embeds = model.get_input_embeddings()(ids.cuda()).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.float().square().mean().backward()
    integration.grouped_gemm_4bit = fused
    del model
    torch.cuda.empty_cache()
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    calls = record_routing(args.model, args.tokens)
    packed = {}
    totals = {"fused": 0.0, "dequantize": 0.0}
    print("| call | GEMM | experts used | max rows | median rows | fused ms | dequantize ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (ends, shape, transpose) in enumerate(calls):
        if shape not in packed:
            weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
            packed[shape] = pack_experts(weight)
        p = packed[shape]
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        used = [c for c in counts if c]
        x = torch.randn(int(ends[-1]), shape[1] if transpose else shape[2], device="cuda")
        x = x.to(torch.bfloat16)
        absmax = _plain_absmax(p)
        fused_ms = median_ms(
            lambda x=x, ends=ends, p=p, absmax=absmax, transpose=transpose: grouped_gemm_4bit(
                x, ends, p.data, absmax, p.state, transpose
            ),
            args.repeats,
        )
        dequant_ms = median_ms(
            lambda x=x, ends=ends, p=p, transpose=transpose: _grouped_linear_4bit(
                x, ends, p, 32, transpose, "dequantize"
            ),
            args.repeats,
        )
        totals["fused"] += fused_ms
        totals["dequantize"] += dequant_ms
        name = f"{shape} {'x @ W' if transpose else 'x @ W^T'}"
        print(
            f"| {i} | {name} | {len(used)} | {max(used)} | {statistics.median(used)} | "
            f"{fused_ms:.3f} | {dequant_ms:.3f} |"
        )
    print(
        f"total over {len(calls)} calls: fused {totals['fused']:.1f} ms, dequantize "
        f"{totals['dequantize']:.1f} ms, ratio {totals['fused'] / totals['dequantize']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
