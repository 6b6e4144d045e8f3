"""P17: an NF4 Linear4bit whose in_features is not a multiple of the blocksize, on a CPU.

A Linear4bit(96, 128) with Gaussian weights (blocksize 64), in training mode with an input
that needs a gradient (how LoRA trains through it): its forward dequantizes the weight with
bitsandbytes' CPU kernel. The reference is the same packed bytes dequantized in plain torch
over the flattened tensor, the order bitsandbytes quantized them in. Exit 1 when the layer's
output differs from x @ reference.T (the AVX-512F kernel scaled rows with other blocks'
absmax), 0 when it matches. On a CPU without AVX-512F bitsandbytes takes its scalar loop,
which is right on the unpatched stack too: inconclusive, nothing to show there.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
from tiny_gemma4 import bug, cpu_has_avx512f, fine, plain_dequantize_4bit

IN_FEATURES, OUT_FEATURES, BLOCKSIZE, TOKENS = 96, 128, 64, 8


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
    raise SystemExit("inconclusive: bitsandbytes' native CPU library did not load")

torch.manual_seed(0)
dense = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
torch.nn.init.normal_(dense.weight, std=0.02)
layer = bnb.nn.Linear4bit(
    IN_FEATURES, OUT_FEATURES, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
)
layer.weight = bnb.nn.Params4bit(
    dense.weight.data.to(torch.bfloat16),
    requires_grad=False,
    blocksize=BLOCKSIZE,
    compress_statistics=False,
    quant_type="nf4",
)
layer = layer.to("cpu").train()  # .to() quantizes
x = torch.randn(TOKENS, IN_FEATURES, dtype=torch.bfloat16, requires_grad=True)
out = layer(x)
expected = x @ plain_dequantize_4bit(layer.weight.data, layer.weight.quant_state).t()
unquantized = x @ dense.weight.t().to(torch.bfloat16)
measured = (
    f"Linear4bit({IN_FEATURES}, {OUT_FEATURES}), blocksize {BLOCKSIZE}, NF4: output off by "
    f"{relative(out, expected):.3f} from the same 4-bit weight dequantized in torch; against "
    f"the BF16 layer {relative(out, unquantized):.3f} (NF4 alone: "
    f"{relative(expected, unquantized):.3f})"
)
if relative(out, expected) > 0.01:
    bug(ValueError(f"wrong scales in bitsandbytes' CPU dequantize_4bit: {measured}"))
if not cpu_has_avx512f():
    raise SystemExit(
        "inconclusive: needs an x86 CPU with AVX-512F (this one takes bitsandbytes' scalar "
        f"dequantization, which is right): {measured}"
    )
fine(f"on a CPU with AVX-512F: {measured}")
