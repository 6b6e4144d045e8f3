"""A fused 4-bit grouped GEMM for packed MoE experts, in Triton.

Dequantizing a layer's experts before grouped GEMM writes and re-reads 1.5 GB of BF16 per
layer at 26B-A4B size, twice (forward, and again in backward): that traffic, not the matrix
products, is what made the dequantize-then-GEMM path 1.3-1.4x slower than BF16 grouped_mm.
These kernels read the packed 4-bit bytes and the block scales of one weight tile, decode
them in registers through the 16-entry code table (NF4 or FP4) and feed them straight to
the tensor cores, so the weights cross memory at half a byte per value and no BF16 copy of
them ever exists.

Rows of `x` are the (token, k) pairs sorted by expert; `ends[e]` is the end row of expert e.
Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows: it finds its expert
from the per-expert tile counts, so no host synchronisation is needed to schedule the grid.
The packed tensor keeps bitsandbytes' layout: the whole (E, rows, cols) tensor flattened,
two values per byte (first in the high nibble), one absmax per `blocksize` values. Bytes
are loaded whole and their two nibbles kept apart: in x @ W^T they multiply the even and
the odd columns of x (split from the loaded tile), in x @ W they make the even and the odd
output columns (joined at the store), so no value is ever shuffled into place. A weight
tile never straddles two scale blocks, so each tile row needs one scale.

One LoRA adapter rides along (y_e = W4_e x + s B_e A_e x) in two steps. A small grouped
kernel computes the low-rank rows h = x A_e^T once per row block (`_low_rank_down_kernel`);
the 4-bit kernels then add s h B_e^T to each output tile in their epilogue, before the store.
Computing h inside the 4-bit kernels instead made every column tile of a row block repeat
it (rank/BLOCK_N more tensor-core work, a second accumulator and factor loads in the hot
loop): 1.27x the kernel without LoRA at 2,048 tokens on an H200, where the epilogue alone
costs a few percent. The rank is padded to a power of two of at least 16 (tl.dot's smallest
operand) with zero rows in the factors. The weight gradients of the factors are per-expert
products over the expert's rows (`_low_rank_grad_kernel`).

Like experts_4bit.py this is a real module (tests run it, on CPU through TRITON_INTERPRET=1);
P13 inserts it into transformers beside experts_4bit.py. Without Triton nothing here is
defined but `fused_4bit_available`, which then says no.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the dequantize-then-GEMM path serves them
    triton = None

# Columns of a weight tile along the packed dimension; tiles must not cross scale blocks.
FUSED_TILE = 64

# Decoding on the GPU: 4 packed bytes (8 codes) per instance. `prmt` looks bytes up in an
# 8-byte pool by 3-bit selectors, so each code's value is found with two 8-entry lookups
# (codes 0-7 and 8-15) per byte of the 16-bit result, a third `prmt` picking between them by
# the code's top bit, and a last one pairing low and high bytes into two 16-bit values;
# then one packed multiply by the block scales. About 4 instructions per value, where
# selecting among 16 constants takes 15 and made the GEMM decode-bound.
_DECODE_ASM = """{
.reg .b32 t<4>, u<4>, nz, r, sel, idx, x0, x1, ha, la, hb, lb, sc01, sc23;
mov.b32 t0, HI0; mov.b32 t1, HI1; mov.b32 t2, HI2; mov.b32 t3, HI3;
mov.b32 u0, LO0; mov.b32 u1, LO1; mov.b32 u2, LO2; mov.b32 u3, LO3;
mov.b32 nz, 0x80008000;
and.b32 idx, $4, 0x7777;
shr.b32 sel, $4, 1;
lop3.b32 sel, sel, 0x4444, 0x3210, 0xEA;
prmt.b32 x0, t0, t1, idx; prmt.b32 x1, t2, t3, idx; prmt.b32 ha, x0, x1, sel;
prmt.b32 x0, u0, u1, idx; prmt.b32 x1, u2, u3, idx; prmt.b32 la, x0, x1, sel;
shr.b32 r, $4, 16;
and.b32 idx, r, 0x7777;
shr.b32 sel, r, 1;
lop3.b32 sel, sel, 0x4444, 0x3210, 0xEA;
prmt.b32 x0, t0, t1, idx; prmt.b32 x1, t2, t3, idx; prmt.b32 hb, x0, x1, sel;
prmt.b32 x0, u0, u1, idx; prmt.b32 x1, u2, u3, idx; prmt.b32 lb, x0, x1, sel;
prmt.b32 $0, la, ha, 0x7351; prmt.b32 $1, lb, hb, 0x7351;
prmt.b32 $2, la, ha, 0x6240; prmt.b32 $3, lb, hb, 0x6240;
cvt.rn.PAIR.f32 sc01, $6, $5; cvt.rn.PAIR.f32 sc23, $8, $7;
fma.rn.PAIR $0, $0, sc01, nz; fma.rn.PAIR $1, $1, sc23, nz;
fma.rn.PAIR $2, $2, sc01, nz; fma.rn.PAIR $3, $3, sc23, nz;
}"""


def decode_asm(code: torch.Tensor, dtype: torch.dtype) -> str:
    """The GPU decoding of `_DECODE_ASM` for this 16-entry code table in bf16 or fp16."""
    bits = [b & 0xFFFF for b in code.to("cpu", dtype).view(torch.int16).tolist()]

    def words(values: list[int]) -> list[str]:
        return [
            hex(sum(v << (8 * i) for i, v in enumerate(values[w : w + 4]))) for w in range(0, 16, 4)
        ]

    asm = _DECODE_ASM.replace("PAIR", "bf16x2" if dtype == torch.bfloat16 else "f16x2")
    for i, (high, low) in enumerate(
        zip(words([b >> 8 for b in bits]), words([b & 0xFF for b in bits]), strict=True)
    ):
        asm = asm.replace(f"HI{i}", high).replace(f"LO{i}", low)
    return asm


@functools.cache
def decode_asm_for(quant_type: str, dtype: torch.dtype) -> str:
    """decode_asm for bitsandbytes' own table of this quant type, built once: reading the
    table from the QuantState on the GPU at every call would synchronise with the device."""
    import bitsandbytes.functional as bnbf

    return decode_asm(bnbf.get_4bit_type(quant_type, device="cpu"), dtype)


def fused_4bit_supports(state) -> bool:
    """Whether this QuantState's layout suits the fused kernels (no tile crosses a block)."""
    return (
        state.quant_type in ("nf4", "fp4")
        and state.blocksize % FUSED_TILE == 0
        and state.shape[-1] % FUSED_TILE == 0
        and state.shape.numel() < 2**31
    )


def fused_4bit_available(x: torch.Tensor, state) -> bool:
    """Whether the fused kernels can run these activations against this QuantState."""
    if triton is None or not x.is_cuda or not fused_4bit_supports(state):
        return False
    # bf16 tensor-core products need Ampere or newer; fp16 runs on Turing too.
    return state.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] >= 8


if triton is not None:

    @triton.jit
    def _expert_tile(
        ends_ptr, num_experts, m_tile, EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr
    ):
        """(expert, first row, end row) of row tile `m_tile`; expert == num_experts past the end."""
        experts = tl.arange(0, EXPERTS_POW2)
        in_range = experts < num_experts
        ends = tl.load(ends_ptr + experts, mask=in_range, other=0)
        starts = tl.load(ends_ptr + experts - 1, mask=in_range & (experts > 0), other=0)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        tile_ends = tl.cumsum(tiles, 0)
        expert = tl.sum((tile_ends <= m_tile).to(tl.int32), 0)
        mine = experts == expert
        first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
        row_end = tl.sum(tl.where(mine, ends, 0), 0)
        row_start = tl.sum(tl.where(mine, starts, 0), 0) + (m_tile - first_tile) * BLOCK_M
        return expert, row_start, row_end

    @triton.jit
    def _decode_tree(nibble, code_ptr):
        """4-bit codes to values by a tree of selects among the 16 table entries."""
        bit0 = (nibble & 1) != 0
        bit1 = (nibble & 2) != 0
        bit2 = (nibble & 4) != 0
        bit3 = (nibble & 8) != 0
        v0 = tl.where(bit0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
        v1 = tl.where(bit0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
        v2 = tl.where(bit0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
        v3 = tl.where(bit0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
        v4 = tl.where(bit0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
        v5 = tl.where(bit0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
        v6 = tl.where(bit0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
        v7 = tl.where(bit0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
        w0 = tl.where(bit1, v1, v0)
        w1 = tl.where(bit1, v3, v2)
        w2 = tl.where(bit1, v5, v4)
        w3 = tl.where(bit1, v7, v6)
        low = tl.where(bit2, w1, w0)
        high = tl.where(bit2, w3, w2)
        return tl.where(bit3, high, low)

    @triton.jit
    def _decode(
        packed,
        scale,
        code_ptr,
        like,
        USE_ASM: tl.constexpr,
        DECODE_ASM: tl.constexpr,
    ):
        """Bytes of two codes each -> (values of the high codes, of the low codes), scaled,
        in the dtype of `like`."""
        if USE_ASM:
            scales = tl.broadcast_to(scale, packed.shape)
            return tl.inline_asm_elementwise(
                DECODE_ASM,
                "=r,=r,=r,=r,r,r,r,r,r",
                [packed, scales],
                dtype=(like.dtype, like.dtype),
                is_pure=True,
                pack=4,
            )
        codes = packed.to(tl.int32)
        high = (_decode_tree(codes >> 4, code_ptr) * scale).to(like.dtype)
        low = (_decode_tree(codes & 15, code_ptr) * scale).to(like.dtype)
        return high, low

    @triton.jit
    def _lora_down(rank_acc, a, down_ptr, expert, ks, K, LORA_R: tl.constexpr):
        """rank_acc + a @ D_e[:, ks]^T: the loaded activation tile through the first LoRA factor,
        D (E, LORA_R, K)."""
        ranks = tl.arange(0, LORA_R)
        factor_rows = (expert * LORA_R + ranks).to(tl.int64) * K
        d = tl.load(down_ptr + factor_rows[:, None] + ks[None, :], mask=ks[None, :] < K, other=0.0)
        return tl.dot(a, tl.trans(d), rank_acc)

    @triton.jit
    def _lora_up(
        acc,
        low_rank_ptr,
        up_ptr,
        scaling,
        expert,
        rows,
        row_ok,
        cols,
        col_ok,
        N,
        LORA_R: tl.constexpr,
    ):
        """acc + scaling * low_rank[rows] @ U_e[:, cols], low_rank (S, LORA_R), U (E, LORA_R, N)."""
        ranks = tl.arange(0, LORA_R)
        low = tl.load(
            low_rank_ptr + rows[:, None].to(tl.int64) * LORA_R + ranks[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        factor_rows = (expert * LORA_R + ranks).to(tl.int64) * N
        u = tl.load(up_ptr + factor_rows[:, None] + cols[None, :], mask=col_ok[None, :], other=0.0)
        # Scaled in float32 on the small operand, rounded once to the compute dtype.
        return tl.dot((low.to(tl.float32) * scaling).to(u.dtype), u, acc)

    @triton.jit
    def _low_rank_down_kernel(
        x_ptr,
        down_ptr,
        low_rank_ptr,
        ends_ptr,
        num_experts,
        K,
        rows_bucket,
        EXPERTS_POW2: tl.constexpr,
        LORA_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """low_rank[rows of e] = x[rows of e] @ D_e^T, x (S, K), D (E, LORA_R, K), low_rank
        (S, LORA_R); one program per row tile, as the 4-bit kernels walk the rows.

        rows_bucket (rows per expert, rounded) is only a key for the autotuner."""
        expert, row_start, row_end = _expert_tile(
            ends_ptr, num_experts, tl.program_id(0), EXPERTS_POW2, BLOCK_M
        )
        if expert >= num_experts:
            return
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        x_rows = x_ptr + rows.to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, LORA_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                x_rows[:, None] + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0
            )
            acc = _lora_down(acc, a, down_ptr, expert, ks, K, LORA_R)
        ranks = tl.arange(0, LORA_R)
        out = low_rank_ptr + rows[:, None].to(tl.int64) * LORA_R + ranks[None, :]
        tl.store(out, acc.to(low_rank_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _x_wt_kernel(
        x_ptr,
        out_ptr,
        ends_ptr,
        packed_ptr,
        absmax_ptr,
        code_ptr,
        lora_up_ptr,
        low_rank_ptr,
        scaling,
        num_experts,
        N,
        K,
        expert_numel,
        rows_bucket,
        EXPERTS_POW2: tl.constexpr,
        QUANT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_ASM: tl.constexpr,
        DECODE_ASM: tl.constexpr,
        LORA_R: tl.constexpr,
    ):
        """out[rows of e] = x[rows of e] @ W_e^T, W (E, N, K) packed; K % BLOCK_K == 0.
        With LORA_R > 0 also + scaling * low_rank[rows of e] @ U_e, low_rank (S, LORA_R) and
        U (E, LORA_R, N).

        rows_bucket (rows per expert, rounded) is only a key for the autotuner."""
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        # Tiles of one row block are adjacent in launch order: its activations are read from
        # memory once and the other row blocks of that expert find its weights in L2.
        expert, row_start, row_end = _expert_tile(
            ends_ptr, num_experts, pid // n_tiles, EXPERTS_POW2, BLOCK_M
        )
        if expert >= num_experts:
            return
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        half = tl.arange(0, BLOCK_K // 2)
        x_rows = x_ptr + rows.to(tl.int64) * K
        weight_rows = expert * expert_numel + cols * K  # flat index of W[e, n, 0]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_rows[:, None] + k0 + ks[None, :], mask=row_ok[:, None], other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            start = weight_rows + k0
            byte_rows = tl.multiple_of(start // 2, BLOCK_K // 2)
            packed = tl.load(
                packed_ptr + byte_rows[:, None] + half[None, :], mask=col_ok[:, None], other=0
            )
            scale = tl.load(absmax_ptr + start // QUANT_BLOCK, mask=col_ok, other=0.0)[:, None]
            high, low = _decode(packed, scale, code_ptr, a, USE_ASM, DECODE_ASM)
            acc = tl.dot(a_even, tl.trans(high), acc)
            acc = tl.dot(a_odd, tl.trans(low), acc)

        if LORA_R > 0:
            acc = _lora_up(
                acc,
                low_rank_ptr,
                lora_up_ptr,
                scaling,
                expert,
                rows,
                row_ok,
                cols,
                col_ok,
                N,
                LORA_R,
            )
        out = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _x_w_kernel(
        x_ptr,
        out_ptr,
        ends_ptr,
        packed_ptr,
        absmax_ptr,
        code_ptr,
        lora_up_ptr,
        low_rank_ptr,
        scaling,
        num_experts,
        N,
        K,
        expert_numel,
        rows_bucket,
        EXPERTS_POW2: tl.constexpr,
        QUANT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_ASM: tl.constexpr,
        DECODE_ASM: tl.constexpr,
        LORA_R: tl.constexpr,
    ):
        """out[rows of e] = x[rows of e] @ W_e, W (E, K, N) packed; N % BLOCK_N == 0.
        LORA_R > 0 adds the low-rank term as _x_wt_kernel does.

        rows_bucket (rows per expert, rounded) is only a key for the autotuner."""
        pid = tl.program_id(0)
        n_tiles = N // BLOCK_N
        expert, row_start, row_end = _expert_tile(
            ends_ptr, num_experts, pid // n_tiles, EXPERTS_POW2, BLOCK_M
        )
        if expert >= num_experts:
            return
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        col0 = (pid % n_tiles) * BLOCK_N
        half = tl.arange(0, BLOCK_N // 2)
        x_rows = x_ptr + rows.to(tl.int64) * K
        weight_col = expert * expert_numel + col0  # flat index of W[e, 0, n0]

        even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                x_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            start = weight_col + ks * N
            byte_rows = tl.multiple_of(start // 2, BLOCK_N // 2)
            packed = tl.load(
                packed_ptr + byte_rows[:, None] + half[None, :], mask=k_ok[:, None], other=0
            )
            scale = tl.load(absmax_ptr + start // QUANT_BLOCK, mask=k_ok, other=0.0)[:, None]
            high, low = _decode(packed, scale, code_ptr, a, USE_ASM, DECODE_ASM)
            even = tl.dot(a, high, even)
            odd = tl.dot(a, low, odd)

        # Column 2i of the tile is even[i], 2i + 1 is odd[i]: acc's columns are `cols` in order.
        acc = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_N))
        cols = col0 + tl.arange(0, BLOCK_N)
        if LORA_R > 0:
            acc = _lora_up(
                acc,
                low_rank_ptr,
                lora_up_ptr,
                scaling,
                expert,
                rows,
                row_ok,
                cols,
                cols < N,
                N,
                LORA_R,
            )
        out = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _low_rank_grad_kernel(
        low_ptr,
        x_ptr,
        out_ptr,
        ends_ptr,
        N,
        rank,
        scaling,
        stride_e,
        stride_r,
        stride_n,
        rows_bucket,
        LORA_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """out[e, :rank, :] = scaling * low[rows of e]^T @ x[rows of e], low (S, LORA_R),
        x (S, N), out (E, rank, N) at any strides; an expert without rows gets zeros.

        Each program sums one expert's rows for one column tile: no atomics, the same
        result every run. rows_bucket (rows per expert, rounded) is only an autotuner key."""
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        expert = pid // n_tiles
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        ranks = tl.arange(0, LORA_R)
        cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((LORA_R, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            low = tl.load(
                low_ptr + rows[:, None].to(tl.int64) * LORA_R + ranks[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            x = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(low), x, acc)
        out = (
            out_ptr
            + expert.to(tl.int64) * stride_e
            + ranks[:, None].to(tl.int64) * stride_r
            + cols[None, :].to(tl.int64) * stride_n
        )
        mask = (ranks[:, None] < rank) & col_ok[None, :]
        tl.store(out, (acc * scaling).to(out_ptr.dtype.element_ty), mask=mask)

    def _configs(shapes: tuple[tuple[int, int, int, int, int], ...]) -> list:
        return [
            triton.Config(
                {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages
            )
            for m, n, k, warps, stages in shapes
        ]

    # LORA_R too: the adapter's extra accumulator and loads may favour other tiles.
    _KEY = ["N", "K", "rows_bucket", "LORA_R"]
    _x_wt_tuned = triton.autotune(
        _configs(
            (
                (32, 128, FUSED_TILE, 4, 4),
                (64, 128, FUSED_TILE, 4, 3),
                (128, 64, FUSED_TILE, 4, 3),
                (128, 128, FUSED_TILE, 8, 3),
                (256, 64, FUSED_TILE, 8, 3),
                (256, 128, FUSED_TILE, 8, 3),
            )
        ),
        key=_KEY,
    )(_x_wt_kernel)
    _x_w_tuned = triton.autotune(
        _configs(
            (
                (32, FUSED_TILE, 64, 4, 4),
                (64, FUSED_TILE, 64, 4, 3),
                (128, FUSED_TILE, 64, 4, 3),
                (128, FUSED_TILE, 128, 8, 3),
                (256, FUSED_TILE, 64, 8, 3),
            )
        ),
        key=_KEY,
    )(_x_w_kernel)
    _low_rank_down_tuned = triton.autotune(
        [
            triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
            for m, k, warps, stages in (
                (32, 128, 4, 3),
                (64, 128, 4, 3),
                (64, 256, 4, 3),
                (128, 64, 4, 4),
                (128, 128, 8, 3),
            )
        ],
        key=["K", "rows_bucket", "LORA_R"],
    )(_low_rank_down_kernel)
    _low_rank_grad_tuned = triton.autotune(
        [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=3)
            for m, n, warps in (
                (32, 128, 4),
                (64, 64, 4),
                (64, 128, 4),
                (64, 256, 8),
                (128, 128, 8),
            )
        ],
        key=["N", "rows_bucket", "LORA_R"],
    )(_low_rank_grad_kernel)


def _rows_bucket(rows: int, num_experts: int) -> int:
    return triton.next_power_of_2(max(1, rows // num_experts))


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device's stream. On a model split over GPUs that
    # need not be x's device: the kernel then races the producer of x on its own device
    # (garbage values, NaN losses, a different MoE routing when checkpointing recomputes).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_4bit(
    x: torch.Tensor,
    ends: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    state,
    transpose: bool,
    blocks: dict | None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    """Runs the kernel of `grouped_gemm_4bit`; `lora` is (U, low_rank, scaling)."""
    num_experts, rows, cols = state.shape
    n, k = (cols, rows) if transpose else (rows, cols)
    out = torch.empty((x.shape[0], n), dtype=state.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    # Without an adapter the LoRA pointers are never read (LORA_R == 0 compiles them out).
    up, low_rank, scaling = lora if lora is not None else (x, x, 0.0)
    arguments = (
        x,
        out,
        ends.to(torch.int32).contiguous(),
        packed.view(torch.uint8).view(-1),
        absmax.float().contiguous(),
        state.code.float().to(x.device).contiguous(),
        up,
        low_rank,
        float(scaling),
        num_experts,
        n,
        k,
        rows * cols,
        _rows_bucket(x.shape[0], num_experts),
    )
    # Triton's interpreter (CPU) cannot run PTX: it takes the select tree.
    gpu_decode = x.is_cuda and state.dtype in (torch.bfloat16, torch.float16)
    constants = {
        "EXPERTS_POW2": triton.next_power_of_2(num_experts),
        "QUANT_BLOCK": state.blocksize,
        "USE_ASM": gpu_decode,
        "DECODE_ASM": decode_asm_for(state.quant_type, state.dtype) if gpu_decode else "",
        "LORA_R": 0 if lora is None else up.shape[1],
    }

    def grid(meta: dict) -> tuple[int]:
        m_tiles = triton.cdiv(x.shape[0], meta["BLOCK_M"]) + num_experts
        return (m_tiles * triton.cdiv(n, meta["BLOCK_N"]),)

    with _on_device(x):
        if blocks is None:
            kernel = _x_w_tuned if transpose else _x_wt_tuned
            kernel[grid](*arguments, **constants)
        else:
            kernel = _x_w_kernel if transpose else _x_wt_kernel
            kernel[grid](*arguments, **constants, **blocks)
    return out


def grouped_gemm_4bit(
    x: torch.Tensor,
    ends: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    state,
    transpose: bool,
    blocks: dict | None = None,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ W_e^T (or @ W_e when `transpose`) for 4-bit packed W.

    `packed` holds the (E, rows, cols) weight in bitsandbytes' 4-bit layout, `absmax` its
    float32 block scales (double quantization already undone). `blocks` fixes the tile
    sizes (BLOCK_M/N/K, optionally num_warps/num_stages) instead of autotuning them; the
    packed dimension's tile (BLOCK_K of x @ W^T, BLOCK_N of x @ W) must divide FUSED_TILE.
    """
    x = x.to(state.dtype).contiguous()
    return _launch_4bit(x, ends, packed, absmax, state, transpose, blocks, None)


def grouped_gemm_4bit_lora(
    x: torch.Tensor,
    ends: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    state,
    transpose: bool,
    down: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
    blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_gemm_4bit plus one low-rank term: (y, low) with low[rows of e] = x[rows of e]
    @ D_e^T (one small kernel) and y = x @ W_e^T (or @ W_e) + scaling * low @ U_e (the 4-bit
    kernel's epilogue).

    D (E, R, x's columns) and U (E, R, y's columns) are in the compute dtype, contiguous,
    their rank R a power of two >= 16 (zero rows past the adapter's rank); `low` is
    (rows, R) in the compute dtype. `blocks` fixes BLOCK_M and BLOCK_K of the first kernel
    too.
    """
    rank = down.shape[1]
    if rank < 16 or rank & (rank - 1) or up.shape[1] != rank:
        raise ValueError(
            f"low-rank factors of rank {rank}, {up.shape[1]}: need one power of 2 >= 16"
        )
    x = x.to(state.dtype).contiguous()
    down, up = down.to(state.dtype).contiguous(), up.to(state.dtype).contiguous()
    low = torch.empty((x.shape[0], rank), dtype=state.dtype, device=x.device)
    if x.shape[0]:
        _launch_low_rank_down(x, ends, down, low, blocks)
    out = _launch_4bit(x, ends, packed, absmax, state, transpose, blocks, (up, low, scaling))
    return out, low


def _launch_low_rank_down(
    x: torch.Tensor, ends: torch.Tensor, down: torch.Tensor, low: torch.Tensor, blocks: dict | None
) -> None:
    num_experts, rank, k = down.shape
    arguments = (
        x,
        down,
        low,
        ends.to(torch.int32).contiguous(),
        num_experts,
        k,
        _rows_bucket(x.shape[0], num_experts),
    )
    constants = {"EXPERTS_POW2": triton.next_power_of_2(num_experts), "LORA_R": rank}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(x.shape[0], meta["BLOCK_M"]) + num_experts,)

    with _on_device(x):
        if blocks is None:
            _low_rank_down_tuned[grid](*arguments, **constants)
        else:
            tiles = {key: blocks[key] for key in ("BLOCK_M", "BLOCK_K")}
            _low_rank_down_kernel[grid](*arguments, **constants, **tiles)


def low_rank_grad(
    low: torch.Tensor,
    x: torch.Tensor,
    ends: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    blocks: dict | None = None,
) -> torch.Tensor:
    """out[e] = scaling * low[rows of e, :out.shape[1]]^T @ x[rows of e] for every expert e:
    a LoRA factor's gradient. low (S, R) and x (S, N) in one dtype, contiguous; out
    (E, rank <= R, N) at any strides (a view of the factor's gradient in its own layout) and
    any float dtype. `blocks` fixes BLOCK_M and BLOCK_N instead of autotuning them."""
    num_experts, rank, n = out.shape
    if x.shape[0] == 0:
        return out.zero_()
    arguments = (
        low.contiguous(),
        x.contiguous(),
        out,
        ends.to(torch.int32).contiguous(),
        n,
        rank,
        float(scaling),
        *out.stride(),
        _rows_bucket(x.shape[0], num_experts),
    )

    def grid(meta: dict) -> tuple[int]:
        return (num_experts * triton.cdiv(n, meta["BLOCK_N"]),)

    with _on_device(x):
        if blocks is None:
            _low_rank_grad_tuned[grid](*arguments, LORA_R=low.shape[1])
        else:
            tiles = {k: v for k, v in blocks.items() if k != "BLOCK_K"}
            _low_rank_grad_kernel[grid](*arguments, LORA_R=low.shape[1], **tiles)
    return out
