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

import functools
import os

import pytest
import torch

from patches.inject import experts_4bit
from patches.inject import experts_4bit_triton as fused_module
from patches.inject.experts_4bit import (
    MAX_FUSED_LORA_RANK,
    ExpertLoRA,
    _plain_absmax,
    dequantize_all,
    experts_4bit_forward,
    grouped_linear_4bit_lora,
    pack_experts,
)
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


# --- LoRA inside the fused kernels ----------------------------------------------------------

# (rank, tiles). Rank 1 and 12 are padded to the kernels' 16 with zero rows; 16 is not; 64 is
# the largest rank fused (run on a GPU only: the interpreter's time grows with the rank).
# Autotuned tiles (None) need a GPU to time them; there they are checked for the benchmark's
# rank (each autotuned rank compiles every config of three kernels).
LORA_CASES = [(1, BLOCKS), (12, BLOCKS), (16, BLOCKS)]
if not INTERPRETED:
    LORA_CASES += [(64, BLOCKS), (16, None)]


def factors(rank: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    """peft's lora_A (r*E, in) and lora_B (out, r*E), trainable, of a size that makes the
    low-rank term a good share of the output."""
    generator = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(rank * EXPERTS, in_features, generator=generator) * 0.1
    lora_b = torch.randn(out_features, rank * EXPERTS, generator=generator) * 0.1
    return [t.to(DEVICE, dtype).requires_grad_() for t in (lora_a, lora_b)]


def lora_reference(x, dense, lora_a, lora_b, scaling: float):
    """x_e @ (W_e + s B_e A_e)^T per expert in float32, peft's layouts read as peft reads
    them (ParamWrapper.get_delta_weight): A expert-major, B rank-major."""
    rank = lora_a.shape[0] // EXPERTS
    out, row = [], 0
    for expert, count in enumerate(ROWS_PER_EXPERT):
        a_e = lora_a.view(EXPERTS, rank, -1)[expert]
        b_e = lora_b.view(lora_b.shape[0], rank, EXPERTS)[:, :, expert]
        x_e = x[row : row + count]
        out.append(x_e @ dense[expert].float().T + scaling * (x_e @ a_e.T) @ b_e.T)
        row += count
    return torch.cat(out)


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    """Within a share of the largest value, as assert_close_to_dequantized; the low-rank
    products add one rounding to the compute dtype of the rank-sized operands."""
    share = 1e-2 if dtype == torch.bfloat16 else 2e-3
    tolerance = share * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "rank, tiles", LORA_CASES, ids=[f"r{r}-{'fixed' if t else 'autotuned'}" for r, t in LORA_CASES]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor_dtype", ["float32", "compute"])
def test_fused_lora_output_and_gradients_match_float32(
    rank: int, dtype: torch.dtype, factor_dtype: str, tiles: dict | None
) -> None:
    """Output and the gradients of x, lora_A and lora_B (in the factors' dtype), over uneven
    routing with empty experts, edge tiles along both weight dimensions, scaling != 1."""
    packed = pack_experts(weight(6, dtype=dtype))
    scaling = 0.5
    lora_a, lora_b = factors(
        rank, COLS, ROWS, torch.float32 if factor_dtype == "float32" else dtype, 7
    )
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(sum(ROWS_PER_EXPERT), COLS, generator=generator).to(DEVICE, dtype)
    x.requires_grad_()
    grad = torch.randn(x.shape[0], ROWS, generator=generator).to(DEVICE, dtype)
    ends = torch.tensor(ROWS_PER_EXPERT).cumsum(0).to(DEVICE, torch.int32)

    out = grouped_linear_4bit_lora(x, ends, packed, ExpertLoRA(lora_a, lora_b, scaling), tiles)
    out.backward(grad)

    leaves = [t.detach().float().requires_grad_() for t in (x, lora_a, lora_b)]
    expected = lora_reference(*leaves[:1], dequantize_all(packed), *leaves[1:], scaling)
    expected.backward(grad.float())
    assert out.dtype == dtype and x.grad.dtype == dtype
    assert lora_a.grad.dtype == lora_a.dtype and lora_b.grad.dtype == lora_b.dtype
    assert_close_to_reference(out, expected, dtype)
    for got, leaf in zip((x, lora_a, lora_b), leaves, strict=True):
        assert_close_to_reference(got.grad, leaf.grad, dtype)
    # The low-rank term is far above the tolerance: it is really there, in peft's layout.
    base = reference(x.detach(), dequantize_all(packed), transpose=False)
    assert (expected.detach() - base).abs().max() > 0.1 * base.abs().max()


class FixedTiles:
    """Stands in for an autotuned kernel: launches `kernel` with fixed tiles (the autotuner
    times its configs on a GPU, which the interpreter has not got)."""

    def __init__(self, kernel, tiles: dict) -> None:
        self.kernel, self.tiles = kernel, tiles

    def __getitem__(self, grid):
        return functools.partial(self.kernel[grid], **self.tiles)


@pytest.fixture
def fused_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """experts_4bit_forward takes the fused kernels on this device (on CPU, through the
    interpreter); returns the list of ranks the fused LoRA path ran with, call by call."""
    monkeypatch.setattr(
        experts_4bit, "fused_4bit_available", lambda x, state: fused_4bit_supports(state)
    )
    if INTERPRETED:
        grad_tiles = {k: v for k, v in BLOCKS.items() if k != "BLOCK_K"}
        down_tiles = {k: v for k, v in BLOCKS.items() if k != "BLOCK_N"}
        for name, kernel, tiles in (
            ("_x_wt_tuned", fused_module._x_wt_kernel, BLOCKS),
            ("_x_w_tuned", fused_module._x_w_kernel, BLOCKS),
            ("_low_rank_down_tuned", fused_module._low_rank_down_kernel, down_tiles),
            ("_low_rank_grad_tuned", fused_module._low_rank_grad_kernel, grad_tiles),
        ):
            monkeypatch.setattr(fused_module, name, FixedTiles(kernel, tiles))
    calls: list[int] = []
    fused = experts_4bit.grouped_linear_4bit_lora

    def counted(x, offsets, packed, adapter, blocks=None):
        calls.append(adapter.lora_A.shape[0] // packed.num_experts)
        return fused(x, offsets, packed, adapter, blocks)

    monkeypatch.setattr(experts_4bit, "grouped_linear_4bit_lora", counted)
    return calls


def moe_layer(dtype: torch.dtype, hidden: int = 64, inner: int = 64, tokens: int = 24):
    """Packed gate_up (E, 2*inner, hidden) and down (E, hidden, inner), a gate, and a routing
    of `tokens` tokens to two experts each that leaves expert 0 without tokens."""
    generator = torch.Generator().manual_seed(10)
    gate_up = pack_experts(
        (torch.randn(EXPERTS, 2 * inner, hidden, generator=generator) * 0.05).to(DEVICE, dtype)
    )
    down = pack_experts(
        (torch.randn(EXPERTS, hidden, inner, generator=generator) * 0.05).to(DEVICE, dtype)
    )
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, dtype)
    probs = torch.randn(tokens, EXPERTS, generator=generator).softmax(-1)
    probs[:, 0] = 0
    weights, index = torch.topk(probs, 2)
    return gate_up, down, x, index.to(DEVICE), weights.to(DEVICE, dtype)


def gate(gate_up_out: torch.Tensor) -> torch.Tensor:
    g, u = gate_up_out.chunk(2, dim=-1)
    return torch.nn.functional.gelu(g, approximate="tanh") * u


def run_layer(layer, ranks: dict[str, list[int]], **settings) -> list[torch.Tensor]:
    """One forward + backward of the experts layer with adapters of these ranks on gate_up
    and down (several on one weight when listed): its output and the gradients of its input
    and of every factor."""
    gate_up, down, x, index, weights = layer
    x = x.clone().requires_grad_()
    adapters, leaves = {}, []
    for seed, (name, packed) in enumerate((("gate_up", gate_up), ("down", down))):
        _, out_features, in_features = packed.shape
        adapters[name] = []
        for i, rank in enumerate(ranks[name]):
            lora_a, lora_b = factors(rank, in_features, out_features, torch.float32, 20 + seed + i)
            adapters[name].append(ExpertLoRA(lora_a, lora_b, 2.0 if seed else 0.5))
            leaves += [lora_a, lora_b]
    out = experts_4bit_forward(
        gate_up,
        down,
        gate,
        x,
        index,
        weights,
        gate_up_lora=adapters["gate_up"],
        down_lora=adapters["down"],
        **settings,
    )
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out))
    return [out.detach(), x.grad, *(t.grad for t in leaves)]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize(
    "ranks, fused_ranks",
    [
        ({"gate_up": [12], "down": [4]}, [12, 4]),
        # Two adapters on gate_up run unfused beside the kernel; down's one is fused.
        ({"gate_up": [4, 8], "down": [16]}, [16]),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_forward_with_fused_lora_matches_the_unfused_path(
    fused_here: list[int], ranks: dict, fused_ranks: list[int], dtype: torch.dtype
) -> None:
    """The whole experts layer (routing, gate, both weights): the fused LoRA path against
    the grouped-GEMM LoRA path on dequantized weights, output and every gradient."""
    layer = moe_layer(dtype)
    fused = run_layer(layer, ranks)
    assert fused_here == fused_ranks
    unfused = run_layer(layer, ranks, kernel="dequantize", lora_kernel="unfused")
    assert fused_here == fused_ranks  # no more fused calls
    share = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for got, expected in zip(fused, unfused, strict=True):
        assert relative_error(got, expected) < share


def test_fusion_is_only_chosen_where_it_applies(fused_here: list[int]) -> None:
    gate_up, _, x, _, _ = moe_layer(DTYPES[0])
    routed = x.repeat(2, 1)

    def adapters(*ranks: int) -> list[ExpertLoRA]:
        return [ExpertLoRA(*factors(r, 64, 128, torch.float32, r), 1.0) for r in ranks]

    chosen = experts_4bit._fuses_lora
    assert chosen(routed, gate_up, adapters(16), "auto", "auto")
    assert chosen(routed, gate_up, adapters(MAX_FUSED_LORA_RANK), "auto", "auto")
    assert not chosen(routed, gate_up, adapters(MAX_FUSED_LORA_RANK + 1), "auto", "auto")
    assert not chosen(routed, gate_up, adapters(4, 4), "auto", "auto")
    assert not chosen(routed, gate_up, adapters(4), "dequantize", "auto")
    assert not chosen(routed, gate_up, adapters(4), "auto", "unfused")
    assert not chosen(routed, gate_up, [], "auto", "auto")
