"""patches/inject/whole_block_rows.py against a model of the kernel it feeds.

bitsandbytes' dequantizeBlockwise4bitCpu (csrc/cpu_ops.cpp, 0.49.0-0.50.2) picks the scale
of row r, column c as below; the real kernel runs in tests/torch and tests/patched_bnb.
"""

from __future__ import annotations

import itertools

import pytest

from patches.inject.whole_block_rows import stackpatch_whole_block_rows


def scale_index(rows: int, cols: int, blocksize: int, avx512f: bool, r: int, c: int) -> int:
    """The absmax entry the native kernel uses for row r, column c of an (rows, cols) call."""
    if avx512f and cols % 16 == 0 and blocksize >= 16:
        # The AVX-512 branch: 8 bytes (16 values) at a time, one scale per step, per row.
        k = (c // 16) * 8
        return r * (cols // blocksize) + k * 2 // blocksize
    return (r * cols + c) // blocksize  # the scalar loop: blocks of the flattened tensor


def wrongly_scaled(rows: int, cols: int, blocksize: int, avx512f: bool) -> int:
    """How many values the kernel scales with another block's absmax."""
    return sum(
        scale_index(rows, cols, blocksize, avx512f, r, c) != (r * cols + c) // blocksize
        for r, c in itertools.product(range(rows), range(cols))
    )


def test_the_model_shows_the_bug_only_on_the_avx512_branch() -> None:
    assert wrongly_scaled(8, 32, 64, avx512f=True) > 0  # rows shorter than a block
    assert wrongly_scaled(4, 96, 64, avx512f=True) > 0  # one and a half blocks per row
    assert wrongly_scaled(4, 64, 128, avx512f=True) > 0  # half a block per row
    assert wrongly_scaled(8, 128, 64, avx512f=True) == 0  # whole blocks: right
    assert wrongly_scaled(8, 40, 64, avx512f=True) == 0  # 40 % 16: the scalar loop
    assert wrongly_scaled(8, 32, 64, avx512f=False) == 0


SHAPES = [(r, c) for r in (1, 3, 8) for c in (16, 32, 40, 48, 64, 96, 128, 192, 4304)]


@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_whole_block_rows_are_scaled_right_on_both_branches(rows, cols, blocksize) -> None:
    new_rows, new_cols = stackpatch_whole_block_rows(rows, cols, blocksize)
    assert new_rows * new_cols == rows * cols
    for avx512f in (True, False):
        assert wrongly_scaled(new_rows, new_cols, blocksize, avx512f) == 0


def test_aligned_rows_are_left_alone() -> None:
    assert stackpatch_whole_block_rows(1408, 2816, 64) == (1408, 2816)
    assert stackpatch_whole_block_rows(8, 128, 64) == (8, 128)


def test_the_rest_become_rows_of_one_block_or_one_row() -> None:
    assert stackpatch_whole_block_rows(512, 32, 64) == (256, 64)
    assert stackpatch_whole_block_rows(128, 96, 64) == (192, 64)
    assert stackpatch_whole_block_rows(3, 40, 64) == (1, 120)  # not whole blocks
