"""Rows of whole quantization blocks for bitsandbytes' CPU 4-bit dequantization.

bitsandbytes quantizes a tensor in blocks of `blocksize` consecutive values of its flattened
elements. Its CPU kernel for `dequantize_4bit` (csrc/cpu_ops.cpp, dequantizeBlockwise4bitCpu,
bitsandbytes 0.49.0 and later) takes the tensor as m rows of n values; on x86 CPUs with
AVX-512F, for n a multiple of 16, it scales the values of row r, column c by
`absmax[r * (n // blocksize) + c // blocksize]`: the right block only when every row starts
one, i.e. when n is a multiple of the blocksize. For any other n (a Linear4bit with
in_features 96 or 4304, P13's experts with rows of 32 values, blocksize 64) it silently
scales rows with other blocks' scales. The scalar kernel (CPUs without AVX-512F) and the
torch fallback index the flattened tensor and are right for every shape.

P17 inserts this function into bitsandbytes/backends/cpu/ops.py and has the kernel hand
`lib` the same bytes as rows of whole blocks; P13 uses it to dequantize packed experts.
"""

from __future__ import annotations


def stackpatch_whole_block_rows(rows: int, cols: int, blocksize: int) -> tuple[int, int]:
    """(rows, cols) for the same values, laid out so that every row starts a block.

    Unchanged when `cols` is a multiple of the blocksize; otherwise rows of one block each
    when the values are whole blocks, else one row (a row needs no scale offset at all).
    """
    if cols % blocksize == 0:
        return rows, cols
    values = rows * cols
    if values % blocksize == 0:
        return values // blocksize, blocksize
    return 1, values
