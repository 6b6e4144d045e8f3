"""patches/inject/experts_4bit_triton.py against bitsandbytes' own dequantization.

In CI, tests/test_torch_suite.py runs this with TRITON_INTERPRET=1 in the newest stack venv
plus Triton: Triton's interpreter runs the kernels on CPU, which checks their indexing
(expert lookup, tiles, masks, nibble order, block scales, both layouts) with the select-tree
decoding. On a GPU (run it there without TRITON_INTERPRET) the same tests run the PTX
decoding in bf16 and fp16. Speed is measured by bench/moe_experts.py.

On CPU the tensors are float16: the interpreter (Triton 3.9) mis-converts a float32 tensor
cast to bfloat16 inside a kernel before tl.dot (values near 1e8), which a GPU does not.
"""

from __future__ import annotations

import os

import pytest
import torch

from patches.inject.experts_4bit import _plain_absmax, dequantize_all, pack_experts
from patches.inject.experts_4bit_triton import (
    fused_4bit_available,
    fused_4bit_supports,
    grouped_gemm_4bit,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = [torch.float16] if INTERPRETED else [torch.bfloat16, torch.float16]

EXPERTS, ROWS, COLS = 8, 48, 128
# Uneven routing: empty experts, one row, exactly one tile, a tile plus one, several tiles.
ROWS_PER_EXPERT = (0, 5, 16, 17, 40, 1, 0, 33)
# ROWS=48 is not a multiple of 32, the tile along it (BLOCK_N of x @ W^T, BLOCK_K of x @ W):
# the masked edges run too. COLS, the packed dimension, holds two 64-value scale blocks.
BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def weight(seed: int, cols: int = COLS, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(EXPERTS, ROWS, cols, generator=generator) * 0.05
    return w.to(DEVICE, dtype)


def reference(x: torch.Tensor, dense: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Row by row per expert in float32, from bitsandbytes' dequantized weights."""
    out, row = [], 0
    for expert, count in enumerate(ROWS_PER_EXPERT):
        w = dense[expert].float()
        out.append(x[row : row + count].float() @ (w if transpose else w.T))
        row += count
    return torch.cat(out)


def assert_close_to_dequantized(out: torch.Tensor, expected: torch.Tensor) -> None:
    # Float32 accumulation in both: the summation order differs, and the PTX decoding
    # rounds code and scale to the compute dtype before multiplying (bitsandbytes rounds
    # their float32 product once), so each weight may differ by an ulp of bf16 (2**-8) or
    # fp16 (2**-11). A wrong code, nibble or scale is off by the size of the values.
    share = 1e-2 if out.dtype == torch.bfloat16 else 2e-3
    tolerance = share * expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_fused_kernel_matches_dequantize_then_matmul(
    quant_type: str, double_quant: bool, transpose: bool, dtype: torch.dtype, blocksize: int
) -> None:
    packed = pack_experts(
        weight(1, dtype=dtype),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=double_quant,
    )
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(sum(ROWS_PER_EXPERT), ROWS if transpose else COLS, generator=generator)
    x = x.to(DEVICE, dtype)
    ends = torch.tensor(ROWS_PER_EXPERT).cumsum(0).to(DEVICE, torch.int32)

    absmax = _plain_absmax(packed)
    out = grouped_gemm_4bit(x, ends, packed.data, absmax, packed.state, transpose, BLOCKS)

    expected = reference(x, dequantize_all(packed), transpose)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close_to_dequantized(out, expected)


def test_every_row_is_written_even_with_experts_left_empty() -> None:
    packed = pack_experts(weight(3))
    x = torch.ones(sum(ROWS_PER_EXPERT), COLS, device=DEVICE, dtype=torch.float16)
    ends = torch.tensor(ROWS_PER_EXPERT).cumsum(0).to(DEVICE, torch.int32)
    absmax = _plain_absmax(packed)
    out = grouped_gemm_4bit(x, ends, packed.data, absmax, packed.state, False, BLOCKS)
    expected = reference(x, dequantize_all(packed), False)
    assert not torch.isnan(out).any()
    assert_close_to_dequantized(out, expected)


def test_not_offered_for_cpu_tensors() -> None:
    # The interpreter runs it here, but a real CPU run takes the dequantize path.
    packed = pack_experts(weight(4).cpu())
    assert not fused_4bit_available(torch.zeros(1, COLS), packed.state)


def test_layouts_whose_tiles_would_straddle_scale_blocks_are_not_supported() -> None:
    assert fused_4bit_supports(pack_experts(weight(5)).state)
    assert fused_4bit_supports(pack_experts(weight(5), blocksize=128).state)
    # 96 values per row: rows start mid-block.
    assert not fused_4bit_supports(pack_experts(weight(5, cols=96)).state)
    assert not fused_4bit_supports(pack_experts(weight(5), blocksize=32).state)


@pytest.mark.skipif(
    INTERPRETED or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)  # fmt: skip
def test_tensors_on_another_gpu_than_the_current_one() -> None:
    """A model split over GPUs calls the kernel with cuda:0 current and x on cuda:1, right
    after cuda:1 produced x: the launch must go to cuda:1's stream, behind the producer."""
    packed = pack_experts(weight(1).to("cuda:1"), quant_type="nf4", blocksize=64)
    ends = torch.tensor(ROWS_PER_EXPERT).cumsum(0).to("cuda:1", torch.int32)
    absmax = _plain_absmax(packed)
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(sum(ROWS_PER_EXPERT), COLS, generator=generator, dtype=torch.float16)
    busy = torch.randn(4096, 4096, device="cuda:1", dtype=torch.float16)
    expected = reference(source.to("cuda:1"), dequantize_all(packed), transpose=False)
    for _ in range(5):
        with torch.cuda.device(0):
            # A long kernel on cuda:1 before x is written there: a launch on cuda:0's stream
            # would read x before its copy lands.
            for _ in range(8):
                busy = busy @ busy * 1e-3
            x = source.to("cuda:1", non_blocking=True) + busy[0, 0] * 0
            out = grouped_gemm_4bit(x, ends, packed.data, absmax, packed.state, False, BLOCKS)
        assert out.device == x.device
        assert_close_to_dequantized(out, expected)
