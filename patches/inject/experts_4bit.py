"""4-bit MoE experts for Gemma 4: fused 3D expert weights kept packed in NF4/FP4.

Gemma4TextExperts stores each layer's experts as two fused 3D tensors, gate_up_proj
(E, 2*I, H) and down_proj (E, H, I). bitsandbytes quantizes only nn.Linear, so under
`load_in_4bit` they stay BF16 (~46 GB for 26B-A4B). Here each 3D tensor is quantized whole
(`bitsandbytes.functional.quantize_4bit` over the flattened tensor, so expert e owns a
contiguous run of packed bytes and absmax blocks) and the forward dequantizes a chunk of
experts at a time and runs grouped GEMM over the tokens routed to that chunk. On a GPU with
Triton the fused kernel of experts_4bit_triton.py replaces that: it decodes the 4-bit
weights inside the GEMM, so no BF16 copy of them is made at all.

A custom autograd function keeps no dequantized weights between forward and backward: the
backward dequantizes each chunk again. The extra memory a layer needs is one chunk of BF16
weights (`chunk_bytes`, 256 MiB by default) instead of the whole layer (1.5 GB at 26B-A4B
size), at the cost of one more dequantization per chunk in backward.

LoRA on the experts (peft `target_parameters`, made to work on packed experts by P15) never
touches the packed weights: y_e = W4_e x + s B_e (A_e x), so no (E, out, in) delta and no
float copy of a weight is ever made. Where the fused kernel runs, one adapter on a weight is
computed with it (GroupedLinear4bitLoRA: a small kernel makes the low-rank rows, the 4-bit
GEMM adds their up-projection in its epilogue, forward and backward, and one small kernel
per factor sums its gradient per expert);
otherwise, and for several adapters on one weight, each adapter's factors run beside the
4-bit GEMM as two low-rank grouped GEMMs over the same routed rows.

This module is imported by tests and benchmarks as is; the stackpatch transform that
installs it into transformers parses this file and inserts its definitions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patches.inject.experts_4bit_triton import (
    fused_4bit_available,
    grouped_gemm_4bit,
    grouped_gemm_4bit_lora,
    low_rank_grad,
)
from patches.inject.whole_block_rows import stackpatch_whole_block_rows

DEFAULT_CHUNK_BYTES = int(os.environ.get("STACKPATCH_EXPERTS_CHUNK_MB", "256")) * 2**20
# "auto": the fused Triton kernel where it can run, else dequantize-then-grouped-GEMM;
# "dequantize": always the latter (for comparison, or if the fused kernel misbehaves).
DEFAULT_KERNEL = os.environ.get("STACKPATCH_EXPERTS_KERNEL", "auto")
EXPERTS_KERNELS = ("auto", "dequantize")
# How expert LoRA's first product on gate_up (whose routed rows are copies of token rows)
# runs: "dense" projects the tokens through every expert's A in one GEMM and gathers,
# "grouped" runs a rank-r grouped GEMM over the routed rows.
DEFAULT_LORA_FIRST_PROJECTION = os.environ.get("STACKPATCH_EXPERT_LORA_FIRST", "grouped")
LORA_FIRST_PROJECTIONS = ("dense", "grouped")
# "auto": one adapter on a weight runs inside the fused 4-bit kernel where that kernel runs;
# "unfused": always as grouped GEMMs beside it (for comparison, or if the fusion misbehaves).
DEFAULT_LORA_KERNEL = os.environ.get("STACKPATCH_EXPERT_LORA_KERNEL", "auto")
LORA_KERNELS = ("auto", "unfused")
# The fused kernels keep a (rows, rank) float32 accumulator per tile beside the output tile;
# ranks above this run unfused rather than risk register spills no GPU run has measured.
MAX_FUSED_LORA_RANK = 64


@dataclass
class PackedExperts:
    """One fused expert weight (E, out, in), quantized as a whole to 4 bits."""

    data: torch.Tensor  # packed 4-bit values, two per byte, in the tensor's element order
    state: object  # bitsandbytes.functional.QuantState of the whole tensor

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def nbytes(self) -> int:
        absmax = self.state.absmax
        nested = self.state.state2.absmax.numel() * 4 if self.state.nested else 0
        return (
            self.data.numel() * self.data.element_size()
            + absmax.numel() * absmax.element_size()
            + nested
        )


def pack_experts(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> PackedExperts:
    """Quantize a fused (E, out, in) expert weight to 4 bits."""
    import bitsandbytes.functional as bnbf

    _, rows, cols = weight.shape
    if (rows * cols) % blocksize:
        raise ValueError(
            f"one expert has {rows * cols} values, not a multiple of the blocksize {blocksize}: "
            "its quantization blocks would straddle experts"
        )
    data, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    return PackedExperts(data, state)


def _plain_absmax(packed: PackedExperts) -> torch.Tensor:
    """Per-block scales as float32, undoing the double quantization if there is one."""
    import bitsandbytes.functional as bnbf

    state = packed.state
    if not state.nested:
        return state.absmax
    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def dequantize_4bit_by_blocks(data: torch.Tensor, state) -> torch.Tensor:
    """`bitsandbytes.functional.dequantize_4bit(data, state)`, asked for as rows that each
    start a quantization block and reshaped to `state.shape`.

    bitsandbytes' CPU kernel (0.49.0 and later, on CPUs with AVX-512F) scales each row as if
    it started a block (whole_block_rows.py): wrong for experts whose rows are not whole
    blocks, e.g. (E, 64, 32) with blocksize 64. The same bytes as whole-block rows are read
    right by every kernel (CUDA, CPU AVX-512 or scalar, the torch fallback).
    """
    import bitsandbytes.functional as bnbf

    shape = torch.Size(state.shape)
    rows = stackpatch_whole_block_rows(shape[:-1].numel(), shape[-1], state.blocksize)
    by_rows = bnbf.QuantState(
        absmax=state.absmax,
        shape=torch.Size(rows),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=state.offset,
        state2=state.state2,
    )
    flat = data.view(torch.uint8).reshape(-1, 1)
    return bnbf.dequantize_4bit(flat, by_rows).reshape(shape)


def dequantize_experts(
    packed: PackedExperts, start: int, stop: int, absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """Experts [start, stop) as a dense (stop - start, out, in) tensor in the compute dtype."""
    import bitsandbytes.functional as bnbf

    state = packed.state
    _, rows, cols = state.shape
    per_expert = rows * cols
    blocks = per_expert // state.blocksize
    absmax = _plain_absmax(packed) if absmax is None else absmax
    chunk_state = bnbf.QuantState(
        absmax=absmax[start * blocks : stop * blocks],
        shape=torch.Size((stop - start, rows, cols)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    data = packed.data.view(torch.uint8).view(-1)[start * per_expert // 2 : stop * per_expert // 2]
    return dequantize_4bit_by_blocks(data, chunk_state)


def dequantize_all(packed: PackedExperts) -> torch.Tensor:
    return dequantize_experts(packed, 0, packed.num_experts)


def experts_per_chunk(packed: PackedExperts, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    _, rows, cols = packed.shape
    per_expert = rows * cols * torch.finfo(packed.state.dtype).bits // 8
    return max(1, min(packed.num_experts, chunk_bytes // per_expert))


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S, in) @ grouped (n, in, out) -> (S, out), with transformers' fallbacks when importable."""
    try:
        from transformers.integrations.moe import _grouped_mm as transformers_grouped_mm
    except ImportError:  # older transformers: torch's own kernel
        return torch.nn.functional.grouped_mm(x.to(weight.dtype), weight, offs=offsets)
    return transformers_grouped_mm(x, weight, offsets)


def _chunk_bounds(
    offsets: torch.Tensor, num_experts: int, per_chunk: int, num_rows: int
) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) per chunk that has rows routed to it."""
    if per_chunk >= num_experts:  # one chunk: no need to read the offsets back from the GPU
        return [(0, num_experts, 0, num_rows)]
    ends = [0, *offsets.tolist()]
    bounds = []
    for start in range(0, num_experts, per_chunk):
        stop = min(num_experts, start + per_chunk)
        if ends[stop] > ends[start]:
            bounds.append((start, stop, ends[start], ends[stop]))
    return bounds


def _grouped_linear_4bit(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: PackedExperts,
    per_chunk: int,
    transpose: bool,
    kernel: str = DEFAULT_KERNEL,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ W_e^T (or @ W_e when `transpose`)."""
    absmax = _plain_absmax(packed)
    if kernel == "auto" and fused_4bit_available(x, packed.state):
        return grouped_gemm_4bit(x, offsets, packed.data, absmax, packed.state, transpose)
    _, rows, cols = packed.shape
    out_features = cols if transpose else rows
    out = x.new_zeros((x.shape[0], out_features), dtype=packed.state.dtype)
    bounds = _chunk_bounds(offsets, packed.num_experts, per_chunk, x.shape[0])
    for start, stop, first, end in bounds:
        weight = dequantize_experts(packed, start, stop, absmax)
        weight = weight if transpose else weight.transpose(-2, -1)
        local = (offsets[start:stop] - first).to(torch.int32)
        out[first:end] = _grouped_mm(x[first:end], weight, local)
        del weight  # free the chunk before dequantizing the next
    return out


class GroupedLinear4bit(torch.autograd.Function):
    """Grouped linear over 4-bit experts; backward re-dequantizes instead of saving weights."""

    @staticmethod
    def forward(ctx, x, offsets, packed, per_chunk, kernel):  # type: ignore[override]
        ctx.save_for_backward(offsets)
        ctx.packed, ctx.per_chunk, ctx.kernel, ctx.input_dtype = packed, per_chunk, kernel, x.dtype
        return _grouped_linear_4bit(x, offsets, packed, per_chunk, transpose=False, kernel=kernel)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        grad_input = _grouped_linear_4bit(
            grad_output, offsets, ctx.packed, ctx.per_chunk, transpose=True, kernel=ctx.kernel
        )
        return grad_input.to(ctx.input_dtype), None, None, None, None


def grouped_linear_4bit(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: PackedExperts,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str = DEFAULT_KERNEL,
) -> torch.Tensor:
    if kernel not in EXPERTS_KERNELS:
        raise ValueError(f"experts kernel {kernel!r}: expected one of {', '.join(EXPERTS_KERNELS)}")
    per_chunk = experts_per_chunk(packed, chunk_bytes)
    return GroupedLinear4bit.apply(x, offsets, packed, per_chunk, kernel)


@dataclass(frozen=True)
class ExpertLoRA:
    """One LoRA adapter on a fused (E, out, in) expert weight, in peft's ParamWrapper layout.

    peft keeps one nn.Linear pair for all experts: `lora_A` (r*E, in) is expert-major (rows
    e*r .. e*r+r-1 belong to expert e) and `lora_B` (out, r*E) is rank-major (column k*E + e is
    rank k of expert e), so expert e's update is scaling * B.view(out, r, E)[:, :, e] @
    A.view(E, r, in)[e]. Reading B expert-major instead would train an adapter that means
    something else in stock peft."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


def _rank_padded(factor: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """`factor` with its rank dimension `dim` zero-padded so a row of a grouped GEMM operand
    spans a multiple of 16 bytes, which torch's grouped_mm requires (bf16: rank 8, 16, ...)."""
    per_row = 16 // factor.element_size()
    missing = -rank % per_row
    if not missing:
        return factor
    pad = [0, 0] * (factor.dim() - 1 - dim) + [0, missing]
    return torch.nn.functional.pad(factor, pad)


@dataclass(frozen=True)
class TokenRows:
    """What routed rows are copies of: row i is `hidden[token[i]]`, routed to `expert[i]`."""

    hidden: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor


def _lora_hidden(
    adapter: ExpertLoRA,
    rank: int,
    num_experts: int,
    x: torch.Tensor,
    offsets: torch.Tensor,
    tokens: TokenRows | None,
) -> torch.Tensor:
    """x_e @ A_e^T for every routed row, its rank dimension padded as `_rank_padded` pads.

    With `tokens`, one dense GEMM projects each token through every expert's A (top-k / E of
    that work is used) and the routed rows' entries are gathered: tensor-core-shaped work on
    the tokens instead of a rank-r grouped GEMM over k times as many routed rows."""
    if tokens is None:
        down = adapter.lora_A.to(x.dtype).view(num_experts, rank, -1).transpose(1, 2)
        return _grouped_mm(x, _rank_padded(down, 2, rank).contiguous(), offsets)
    every = tokens.hidden @ adapter.lora_A.to(tokens.hidden.dtype).t()  # (tokens, E * r)
    rows = every.view(-1, num_experts, rank)[tokens.token, tokens.expert]
    return _rank_padded(rows, 1, rank)


def expert_lora_delta(
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapters: Sequence[ExpertLoRA],
    num_experts: int,
    tokens: TokenRows | None = None,
) -> torch.Tensor | None:
    """sum over adapters of scaling * (x_e @ A_e^T) @ B_e^T for the rows routed to each expert;
    the second product is a rank-r grouped GEMM, the first one too unless `tokens` says what
    the rows are copies of (then a dense GEMM). Differentiable in x, A and B."""
    total = None
    for adapter in adapters:
        rank = adapter.lora_A.shape[0] // num_experts
        # (E, r, out): expert e's B_e^T, scaled (on the small factor, not on the output).
        up = (adapter.lora_B * adapter.scaling).to(x.dtype)
        up = _rank_padded(up.view(-1, rank, num_experts).permute(2, 1, 0), 1, rank).contiguous()
        hidden = _lora_hidden(adapter, rank, num_experts, x, offsets, tokens)
        delta = _grouped_mm(hidden, up, offsets)
        total = delta if total is None else total + delta
    return total


def _with_lora(
    base: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    adapters: Sequence[ExpertLoRA],
    num_experts: int,
    tokens: TokenRows | None = None,
) -> torch.Tensor:
    delta = expert_lora_delta(x, offsets, adapters, num_experts, tokens)
    return base if delta is None else base + delta.to(base.dtype)


def _fused_rank(rank: int) -> int:
    """The fused kernels' rank dimension: a power of two, and at least tl.dot's 16."""
    return max(16, 1 << (rank - 1).bit_length())


def _rank_padded_copy(factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An (E, rank, features) factor view as a contiguous (E, _fused_rank(rank), features)
    tensor in `dtype`, zero past `rank`."""
    experts, rank, features = factor.shape
    padded = _fused_rank(rank)
    if padded == rank and factor.dtype == dtype and factor.is_contiguous():
        return factor
    out = factor.new_empty((experts, padded, features), dtype=dtype)
    out[:, rank:].zero_()
    out[:, :rank].copy_(factor)  # one kernel for the cast and peft's layout together
    return out


def _fused_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's A (r*E, in) and rank-major B (out, r*E) as the fused kernels' factors,
    D (E, R, in) with D_e = A_e and U (E, R, out) with U_e = B_e^T (unscaled: the kernels
    scale the rank-sized products)."""
    rank = lora_A.shape[0] // num_experts
    down = lora_A.view(num_experts, rank, lora_A.shape[1])
    up = lora_B.view(lora_B.shape[0], rank, num_experts).permute(2, 1, 0)
    return _rank_padded_copy(down, dtype), _rank_padded_copy(up, dtype)


class GroupedLinear4bitLoRA(torch.autograd.Function):
    """GroupedLinear4bit plus one expert LoRA adapter, computed inside the fused 4-bit kernels.

    Forward, two kernels: h = x A_e^T, then y = x W_e^T + s h B_e^T (the 4-bit GEMM's epilogue).
    Backward, two kernels: g = dy B_e, then dx = dy W_e + s g A_e; then
    dA_e = s g_e^T x_e and dB_e = s h_e^T dy_e by one small kernel each, stored straight into
    peft's layouts (B rank-major) in the factors' own dtype. Saved for backward: x (dA needs
    it, as the unfused path's grouped GEMM saves it too), h (rows x R), and the factors in
    the kernels' layout (E x R x features each), not the 4-bit weights' dequantized values.
    """

    @staticmethod
    def forward(ctx, x, offsets, packed, lora_A, lora_B, scaling, blocks):  # type: ignore[override]
        state = packed.state
        down, up = _fused_factors(lora_A, lora_B, packed.num_experts, state.dtype)
        inputs = x.to(state.dtype).contiguous()
        absmax = _plain_absmax(packed)
        out, hidden = grouped_gemm_4bit_lora(
            inputs, offsets, packed.data, absmax, state, False, down, up, scaling, blocks
        )
        ctx.save_for_backward(inputs, offsets, down, up, hidden)
        ctx.packed, ctx.scaling, ctx.blocks, ctx.input_dtype = packed, scaling, blocks, x.dtype
        ctx.factors = (lora_A.shape, lora_A.dtype, lora_B.shape, lora_B.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        inputs, offsets, down, up, hidden = ctx.saved_tensors
        packed, scaling, blocks = ctx.packed, ctx.scaling, ctx.blocks
        grad = grad_output.to(packed.state.dtype).contiguous()
        absmax = _plain_absmax(packed)
        # Transposed, the factors swap roles: B_e^T (U) is applied to dy first, then A_e (D).
        grad_x, grad_hidden = grouped_gemm_4bit_lora(
            grad, offsets, packed.data, absmax, packed.state, True, up, down, scaling, blocks
        )
        a_shape, a_dtype, b_shape, b_dtype = ctx.factors
        experts = packed.num_experts
        rank = a_shape[0] // experts
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = inputs.new_empty(a_shape, dtype=a_dtype)
            by_expert = grad_a.view(experts, rank, a_shape[1])
            low_rank_grad(grad_hidden, inputs, offsets, by_expert, scaling, blocks)
        if ctx.needs_input_grad[4]:
            grad_b = inputs.new_empty(b_shape, dtype=b_dtype)
            by_expert = grad_b.view(b_shape[0], rank, experts).permute(2, 1, 0)
            low_rank_grad(hidden, grad, offsets, by_expert, scaling, blocks)
        grad_x = grad_x.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a, grad_b, None, None


def grouped_linear_4bit_lora(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: PackedExperts,
    adapter: ExpertLoRA,
    blocks: dict | None = None,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ (W_e + s B_e A_e)^T through the fused kernels (which
    must be able to run: see `_fuses_lora`); `blocks` fixes their tiles, as in
    grouped_gemm_4bit."""
    return GroupedLinear4bitLoRA.apply(
        x, offsets, packed, adapter.lora_A, adapter.lora_B, adapter.scaling, blocks
    )


def _fuses_lora(
    x: torch.Tensor,
    packed: PackedExperts,
    adapters: Sequence[ExpertLoRA],
    kernel: str,
    lora_kernel: str,
) -> bool:
    """Whether these adapters run inside the fused 4-bit kernel: one adapter (several run
    unfused), of a rank the kernels take, where the fused kernel runs at all."""
    if kernel != "auto" or lora_kernel != "auto" or len(adapters) != 1:
        return False
    rank = adapters[0].lora_A.shape[0] // packed.num_experts
    return 0 < rank <= MAX_FUSED_LORA_RANK and fused_4bit_available(x, packed.state)


def _expert_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: PackedExperts,
    adapters: Sequence[ExpertLoRA],
    fused: bool,
    chunk_bytes: int,
    kernel: str,
    tokens: TokenRows | None = None,
) -> torch.Tensor:
    """x_e @ W_e^T for the 4-bit weight plus the adapters' updates: inside the fused kernel
    when `fused`, else beside the 4-bit GEMM."""
    if fused:
        return grouped_linear_4bit_lora(x, offsets, packed, adapters[0])
    out = grouped_linear_4bit(x, offsets, packed, chunk_bytes, kernel)
    return _with_lora(out, x, offsets, adapters, packed.num_experts, tokens)


def route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, k) pairs by expert: the permutation and the int32 end offset of each expert.

    The end offset of expert e is the number of sorted ids <= e, found by binary search. Not
    `bincount` + `cumsum`: CUDA's bincount copies the smallest id to the host (a negative
    check) and reads the largest back (to size its output), two device synchronisations in
    every MoE layer (120 per training step at 26B-A4B, forward and checkpointed recompute:
    all but 4 of the step's cudaStreamSynchronize), which keep the host from queueing ahead
    of the GPU.
    """
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    experts = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return perm, torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)


def experts_4bit_forward(
    gate_up: PackedExperts,
    down: PackedExperts,
    apply_gate,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str = DEFAULT_KERNEL,
    gate_up_lora: Sequence[ExpertLoRA] = (),
    down_lora: Sequence[ExpertLoRA] = (),
    lora_first_projection: str = DEFAULT_LORA_FIRST_PROJECTION,
    lora_kernel: str = DEFAULT_LORA_KERNEL,
) -> torch.Tensor:
    """The MoE experts computation of Gemma4TextExperts with 4-bit weights, plus the LoRA
    adapters on either fused weight (added before the gate, and before the routing weights,
    as peft's W + delta W would be). `lora_kernel` "auto" runs one adapter on a weight inside
    the fused 4-bit kernel where it runs; otherwise `lora_first_projection` says how gate_up's
    A runs beside it: "dense" on the tokens, or "grouped" over the routed rows."""
    if lora_first_projection not in LORA_FIRST_PROJECTIONS:
        raise ValueError(
            f"expert LoRA first projection {lora_first_projection!r}: expected one of "
            f"{', '.join(LORA_FIRST_PROJECTIONS)}"
        )
    if lora_kernel not in LORA_KERNELS:
        raise ValueError(
            f"expert LoRA kernel {lora_kernel!r}: expected one of {', '.join(LORA_KERNELS)}"
        )
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = gate_up.num_experts
    perm, offsets = route(top_k_index, num_experts)
    token_of_row = perm // top_k
    routed = hidden_states[token_of_row]
    fused = _fuses_lora(routed, gate_up, gate_up_lora, kernel, lora_kernel)
    tokens = None
    if gate_up_lora and lora_first_projection == "dense" and not fused:
        tokens = TokenRows(hidden_states, token_of_row, top_k_index.reshape(-1)[perm])
    gate_up_out = _expert_linear(
        routed, offsets, gate_up, gate_up_lora, fused, chunk_bytes, kernel, tokens
    )
    gated = apply_gate(gate_up_out)
    fused = _fuses_lora(gated, down, down_lora, kernel, lora_kernel)
    down_out = _expert_linear(gated, offsets, down, down_lora, fused, chunk_bytes, kernel)
    weighted = down_out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(down_out.dtype)
    combined = torch.zeros(
        (num_tokens * top_k, hidden_dim), dtype=weighted.dtype, device=weighted.device
    )
    combined = combined.index_copy(0, perm, weighted)
    return combined.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
