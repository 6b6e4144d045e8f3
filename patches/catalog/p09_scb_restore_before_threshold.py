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
        "The state P9 guards against is real, but forward never meets it: accelerate's offload "
        "hook clears state.SCB (not CB) after each forward of an offloaded Linear8bitLt (P2), "
        "yet before the next forward, recomputation included, the same hook loads the weight "
        "with CB and SCB and Linear8bitLt.forward copies both into the state "
        "(init_8bit_state), bitsandbytes 0.45-0.50.2, accelerate 1.13-1.15. Only backward "
        "reads the cleared state, which P2 fixes. Kept for users of the collection, off by "
        "default."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P9",
    ),
)
