"""P4 (historical): apply_rotary_pos_emb moves cos/sin to the device of the states it rotates."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

from ._device_placement import NOT_REPRODUCED

# `cos = cos.unsqueeze(unsqueeze_dim)` and the same for sin
_COS_OR_SIN = m.Name("cos") | m.Name("sin")
_UNSQUEEZE = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(_COS_OR_SIN)],
            value=m.Call(
                func=m.Attribute(value=m.Name("cos") | m.Name("sin"), attr=m.Name("unsqueeze"))
            ),
        )
    ]
)


class MoveCosSinToStates(PatchTransform):
    DESCRIPTION = "Move cos and sin to x.device in Gemma 4's apply_rotary_pos_emb."
    SCOPE = ("apply_rotary_pos_emb",)
    SITES = 2

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if not self.within_scope() or not m.matches(updated_node, _UNSQUEEZE):
            return updated_node
        assign = cst.ensure_type(updated_node.body[0], cst.Assign)
        moved = cst.Call(
            func=cst.Attribute(value=assign.value, attr=cst.Name("to")),
            args=[cst.Arg(cst.parse_expression("x.device"))],
        )
        return self.with_value(updated_node, moved)


PATCH = Patch(
    id="P4",
    slug="rope-cos-sin-device",
    title="Gemma 4 RoPE: cos/sin moved to the device of the query/key states",
    package="transformers",
    affected=">=5.5.0",
    status=Status.HISTORICAL,
    targets=(Target("transformers/models/gemma4/modeling_gemma4.py", MoveCosSinToStates),),
    rationale=(
        "The collection's P4 reports cos/sin on the CPU while q/k are on CUDA under CPU "
        "offload, and moves them to x.device in apply_rotary_pos_emb."
    ),
    historical_reason=NOT_REPRODUCED,
    references=(
        "https://github.com/huggingface/transformers/issues/45482",
        "consumer-llm-patches P4",
    ),
)
