"""bitsandbytes' CPU dequantize_4bit with P17 applied, inside a real stack venv.

tests/test_torch_suite.py runs this with a P17-patched copy of the stack's bitsandbytes first
on PYTHONPATH. Every result must equal plain torch's over the flattened blocks, bit for bit,
whichever branch this CPU's native kernel takes: on CPUs with AVX-512F the branch P17
corrects, elsewhere the scalar loop P17 must leave right.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.backends.cpu.ops as cpu_ops
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from tiny_gemma4 import plain_dequantize_4bit


def test_bitsandbytes_is_patched() -> None:
    assert hasattr(cpu_ops, "stackpatch_whole_block_rows"), cpu_ops.__file__


# Rows shorter than a block, rows of one and a half blocks, SigLIP's MLP width (4304), whole
# blocks, and a flat tensor.
SHAPES = [(512, 32), (128, 96), (16, 4304), (64, 128), (4096,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_4bit_equals_plain_torch(shape, blocksize, quant_type, dtype) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    data, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    # bitsandbytes returns a flat tensor as one row: compare the values.
    got, expected = dequantize_4bit(data, state).reshape(shape), plain_dequantize_4bit(data, state)
    if dtype == torch.float16:
        # bitsandbytes 0.49's scalar loop (CPUs without AVX-512F) rounds float16 halves up,
        # torch to even: one unit in the last place apart at most.
        torch.testing.assert_close(got, expected, rtol=2**-10, atol=0)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bitsandbytes_own_large_block_case(quant_type, dtype) -> None:
    """bitsandbytes' tests' (1024, 1024) with blocksize 2048: the 'AVX-512 accuracy issue'
    its PR 1828 routed to a torch fallback (0.49: not for bfloat16, which stays native and
    needs P17). That fallback rounds the code table to the dtype first in 0.49: close, not
    identical."""
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    data, state = quantize_4bit(weight, blocksize=2048, quant_type=quant_type)
    got, expected = dequantize_4bit(data, state), plain_dequantize_4bit(data, state)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)


def test_linear4bit_trains_on_the_weight_it_stores() -> None:
    """A Linear4bit(96, 128) in training mode, the reproducer's layer."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(96, 128, bias=False, compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(128, 96).to(torch.bfloat16), requires_grad=False, quant_type="nf4"
    )
    layer = layer.to("cpu").train()
    x = torch.randn(8, 96, dtype=torch.bfloat16, requires_grad=True)
    weight = plain_dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(layer(x), x @ weight.t())
