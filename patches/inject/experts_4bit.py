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
touches the packed weights: each adapter's per-expert factors run beside the 4-bit GEMM as
two low-rank grouped GEMMs over the same routed rows, y_e = W4_e x + s B_e (A_e x), so no
(E, out, in) delta and no float copy of a weight is ever made.

This module is imported by tests and benchmarks as is; the stackpatch transform that
installs it into transformers parses this file and inserts its definitions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patches.inject.experts_4bit_triton import fused_4bit_available, grouped_gemm_4bit
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
) -> torch.Tensor:
    """The MoE experts computation of Gemma4TextExperts with 4-bit weights, plus the LoRA
    adapters on either fused weight (added before the gate, and before the routing weights,
    as peft's W + delta W would be). `lora_first_projection` says how gate_up's A runs:
    "dense" on the tokens, or "grouped" over the routed rows."""
    if lora_first_projection not in LORA_FIRST_PROJECTIONS:
        raise ValueError(
            f"expert LoRA first projection {lora_first_projection!r}: expected one of "
            f"{', '.join(LORA_FIRST_PROJECTIONS)}"
        )
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = gate_up.num_experts
    perm, offsets = route(top_k_index, num_experts)
    token_of_row = perm // top_k
    routed = hidden_states[token_of_row]
    gate_up_out = grouped_linear_4bit(routed, offsets, gate_up, chunk_bytes, kernel)
    tokens = None
    if gate_up_lora and lora_first_projection == "dense":
        tokens = TokenRows(hidden_states, token_of_row, top_k_index.reshape(-1)[perm])
    gate_up_out = _with_lora(gate_up_out, routed, offsets, gate_up_lora, num_experts, tokens)
    gated = apply_gate(gate_up_out)
    down_out = grouped_linear_4bit(gated, offsets, down, chunk_bytes, kernel)
    down_out = _with_lora(down_out, gated, offsets, down_lora, num_experts)
    weighted = down_out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(down_out.dtype)
    combined = torch.zeros(
        (num_tokens * top_k, hidden_dim), dtype=weighted.dtype, device=weighted.device
    )
    combined = combined.index_copy(0, perm, weighted)
    return combined.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
