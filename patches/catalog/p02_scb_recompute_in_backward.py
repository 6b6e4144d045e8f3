"""P2 (historical): MatMul8bitLt.backward recomputes a missing SCB from CB."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `if state.CB is not None:`, where backward dequantizes CB with SCB for grad_A
CB_PRESENT = m.If(
    test=m.Comparison(
        left=m.Attribute(value=m.Name("state"), attr=m.Name("CB")),
        comparisons=[m.ComparisonTarget(operator=m.IsNot(), comparator=m.Name("None"))],
    )
)
RECOMPUTE = (
    "if state.CB is not None and state.SCB is None:\n"
    "    state.SCB = state.CB.abs().amax(dim=1).to(torch.float32)\n"
)


class RecomputeScbInBackward(PatchTransform):
    DESCRIPTION = "Recompute SCB from CB in MatMul8bitLt.backward when the state has none."
    SCOPE = ("MatMul8bitLt", "backward")

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not self.within_scope():
            return updated_node
        return self.insert_beside(updated_node, CB_PRESENT, RECOMPUTE, before=True)


PATCH = Patch(
    id="P2",
    slug="scb-recompute-in-backward",
    title="MatMul8bitLt.backward recomputes a missing SCB from CB",
    package="bitsandbytes",
    affected=">=0.45.0",
    status=Status.HISTORICAL,
    targets=(Target("bitsandbytes/autograd/_functions.py", RecomputeScbInBackward),),
    rationale=(
        "The collection's P2 guards MatMul8bitLt.backward against state.SCB being None while "
        "state.CB is set (the grad_A path multiplies CB by SCB) by recomputing SCB from CB."
    ),
    historical_reason=(
        "No organic path leaves CB without SCB (they are set together in forward and in "
        "Linear8bitLt.init_8bit_state, bitsandbytes 0.45-0.50.2); the collection's reproducer "
        "forced SCB to None by hand. The recomputation cannot be right either: CB is the int8 "
        "weight scaled so that every row's absolute maximum is 127, so the row scales SCB held "
        "cannot be recovered from it. Kept for users of the collection, off by default; do not "
        "enable it."
    ),
    references=(
        "https://github.blesdmm.dns-dynamic.net/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P2",
    ),
)
