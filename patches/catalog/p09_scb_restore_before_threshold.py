"""P9 (historical): restore a lost SCB from the int8 weight before MatMul8bitLt's threshold path."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

_STATE = m.Name("state")
# `if state.threshold > 0.0:`, the outlier (sparse decomposition) branch of forward
THRESHOLD_BRANCH = m.If(test=m.Comparison(left=m.Attribute(value=_STATE, attr=m.Name("threshold"))))
RESTORE = 'if state.SCB is None and getattr(B, "SCB", None) is not None:\n    state.SCB = B.SCB\n'


class RestoreScbBeforeThreshold(PatchTransform):
    DESCRIPTION = "Take SCB from the int8 weight when the state lost it, before the outlier branch."
    SCOPE = ("MatMul8bitLt", "forward")

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        block = cst.ensure_type(updated_node.body, cst.IndentedBlock)
        body = self.insert_beside(block, THRESHOLD_BRANCH, RESTORE, before=True)
        return updated_node.with_changes(body=body)


PATCH = Patch(
    id="P9",
    slug="scb-restore-before-threshold",
    title="MatMul8bitLt.forward restores a lost SCB from the int8 weight before the outlier path",
    package="bitsandbytes",
    affected=">=0.45.0",
    status=Status.HISTORICAL,
    targets=(Target("bitsandbytes/autograd/_functions.py", RestoreScbBeforeThreshold),),
    rationale=(
        "The collection's P9 assumed that gradient-checkpointing recomputation can reach "
        "MatMul8bitLt.forward with state.CB set but state.SCB None, and restores SCB from the "
        "weight before the `state.threshold > 0.0` branch uses it."
    ),
    historical_reason=(
        "Built on P2's assumption, which no public code path produces: Linear8bitLt.forward "
        "copies CB and SCB from the weight into the state together (init_8bit_state), and "
        "MatMul8bitLt.forward re-quantizes whenever either is None on the path that sets them. "
        "The collection's author withdrew it with P2 (its reproducer forced SCB to None); "
        "kept for users of the collection, off by default."
    ),
    references=(
        "https://github.blesdmm.dns-dynamic.net/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P9",
    ),
)
