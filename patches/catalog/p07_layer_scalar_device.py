"""P7 (historical): the Gemma 4 decoder layer moves layer_scalar to the device of its states."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

from ._device_placement import NOT_REPRODUCED

# `hidden_states *= self.layer_scalar`
_SCALE = m.SimpleStatementLine(
    body=[
        m.AugAssign(
            target=m.Name("hidden_states"),
            operator=m.MultiplyAssign(),
            value=m.Attribute(value=m.Name("self"), attr=m.Name("layer_scalar")),
        )
    ]
)


class MoveLayerScalarToStates(PatchTransform):
    DESCRIPTION = "Multiply by layer_scalar moved to hidden_states.device."
    SCOPE = ("Gemma4TextDecoderLayer", "forward")

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if not self.within_scope() or not m.matches(updated_node, _SCALE):
            return updated_node
        moved = cst.parse_expression("self.layer_scalar.to(hidden_states.device)")
        return self.with_value(updated_node, moved)


PATCH = Patch(
    id="P7",
    slug="layer-scalar-device",
    title="Gemma 4 decoder layer: layer_scalar moved to the device of the hidden states",
    package="transformers",
    affected=">=5.5.0",
    status=Status.HISTORICAL,
    targets=(Target("transformers/models/gemma4/modeling_gemma4.py", MoveLayerScalarToStates),),
    rationale=(
        "The collection's P7 reports the decoder layer's layer_scalar buffer on the CPU while "
        "the layer runs on CUDA, and moves it to hidden_states.device before the multiply."
    ),
    historical_reason=NOT_REPRODUCED,
    references=(
        "https://github.com/huggingface/transformers/issues/45482",
        "consumer-llm-patches P7",
    ),
)
