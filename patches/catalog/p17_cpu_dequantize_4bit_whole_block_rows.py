"""P17: bitsandbytes' CPU dequantize_4bit scales rows that are not whole blocks wrongly."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

SOURCE = Path(__file__).resolve().parent.parent / "inject" / "whole_block_rows.py"


def _string(text: str) -> m.SimpleString:
    return m.SimpleString(value=m.MatchIfTrue(lambda value: value[1:-1] == text))


# `@register_kernel("bitsandbytes::dequantize_4bit", "cpu")` on the CPU backend's kernel.
_CPU_DEQUANTIZE_4BIT = m.Decorator(
    decorator=m.Call(
        func=m.Name("register_kernel"),
        args=[m.Arg(_string("bitsandbytes::dequantize_4bit")), m.Arg(_string("cpu"))],
    )
)
# `n = shape[-1]`: the row length the kernel hands to the native library, with `m` rows.
_ROW_LENGTH = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Name("n"))], value=m.Subscript(m.Name("shape")))]
)
_CALL = "m, n = stackpatch_whole_block_rows(m, n, blocksize)\n"


class DequantizeWholeBlockRows(PatchTransform):
    DESCRIPTION = (
        "Hand the native CPU 4-bit dequantization kernel rows that each start a quantization "
        "block (same bytes, same order), and append the helper that computes them."
    )
    # Every kernel of the CPU backend is a function named `_`; the decorator tells them apart.
    SCOPE = ("_",)
    SITES = 2

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        if not any(m.matches(d, _CPU_DEQUANTIZE_4BIT) for d in updated_node.decorators):
            return updated_node
        body = cst.ensure_type(updated_node.body, cst.IndentedBlock)
        return updated_node.with_changes(
            body=self.insert_beside(body, _ROW_LENGTH, _CALL, before=False)
        )

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        return self.with_injected(updated_node, SOURCE)


PATCH = Patch(
    id="P17",
    slug="cpu-dequantize-4bit-whole-block-rows",
    title="bitsandbytes' CPU dequantize_4bit scales rows that are not whole blocks correctly",
    package="bitsandbytes",
    affected=">=0.49.0",
    status=Status.UPSTREAMABLE,
    targets=(Target("bitsandbytes/backends/cpu/ops.py", DequantizeWholeBlockRows),),
    rationale=(
        "bitsandbytes quantizes 4-bit weights in blocks of consecutive values of the "
        "flattened tensor. Its native CPU dequantize_4bit (bitsandbytes 0.49.0 and later; "
        "csrc/cpu_ops.cpp, dequantizeBlockwise4bitCpu) takes the weight as m rows of n values, "
        "and on x86 CPUs with AVX-512F (for n a multiple of 16) scales row r, column c by "
        "absmax[r * (n // blocksize) + c // blocksize]: right only when n is a multiple of the "
        "blocksize. Otherwise every row after the first is scaled with other blocks' absmax, "
        "silently. It hits every Linear4bit whose in_features is not a multiple of the "
        "blocksize (64 by default), e.g. 96, or 4304 (the MLP width of the SigLIP vision "
        "towers of LLaVA-OneVision and Aya Vision), whenever its weight is dequantized: every "
        "CPU forward that needs gradients, every other one unless AVX512-BF16's packed kernel "
        "takes it, model.dequantize(), PEFT's merge (a Linear4bit(96, 128) with Gaussian "
        "weights: 25% relative error against BF16 instead of NF4's 9%). CPUs without "
        "AVX-512F take the scalar loop, which is right, so the same code "
        "passes on one machine and fails on the next. bitsandbytes' own 'accuracy issue for "
        "blocksize >= 2048' (worked around by PR 1828 with a torch fallback, in 0.49 not for "
        "bfloat16) is this bug: its tests' rows of 1024 are shorter than such blocks. The "
        "NEON path added in 0.50 checks n % blocksize; the AVX-512 path does not (still so on "
        "main in August 2026). The patch hands the kernel the same bytes as rows that each "
        "start a block (n unchanged when it is a multiple of the blocksize)."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/blob/0.49.2/csrc/cpu_ops.cpp",
        "https://github.com/bitsandbytes-foundation/bitsandbytes/pull/1828",
    ),
    reproducer="validation/p17_cpu_dequantize_4bit_short_rows.py",
)
