"""P5 (historical): the Gemma 4 decoder layer moves its inputs to the device of its states."""

from __future__ import annotations

import libcst as cst

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

from ._device_placement import NOT_REPRODUCED

MOVE_INPUTS = (
    "if attention_mask is not None:\n"
    "    attention_mask = attention_mask.to(hidden_states.device)\n",
    "if position_ids is not None:\n    position_ids = position_ids.to(hidden_states.device)\n",
    "if position_embeddings is not None:\n"
    "    position_embeddings = tuple(t.to(hidden_states.device) for t in position_embeddings)\n",
)


class MoveLayerInputsToStates(PatchTransform):
    DESCRIPTION = "Move attention_mask, position_ids and position_embeddings to the layer's device."
    SCOPE = ("Gemma4TextDecoderLayer", "forward")
    SITES = len(MOVE_INPUTS)

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        # One decoder layer class per modeling file; a second definition is not ours to move.
        if self.carries_marker(original_node) or self.rewritten:
            return updated_node
        block = cst.ensure_type(updated_node.body, cst.IndentedBlock)
        moves = [self.marked_statement(source) for source in MOVE_INPUTS]
        for _ in moves:
            self.count_rewrite()
        return updated_node.with_changes(body=block.with_changes(body=[*moves, *block.body]))


PATCH = Patch(
    id="P5",
    slug="decoder-layer-inputs-device",
    title="Gemma 4 decoder layer: masks, position ids and embeddings moved to its device",
    package="transformers",
    affected=">=5.5.0",
    status=Status.HISTORICAL,
    targets=(Target("transformers/models/gemma4/modeling_gemma4.py", MoveLayerInputsToStates),),
    rationale=(
        "The collection's P5 reports position_ids and attention_mask left on the CPU when a "
        "layer runs on CUDA, and moves them (and the position embeddings) to "
        "hidden_states.device at the start of the decoder layer."
    ),
    historical_reason=NOT_REPRODUCED,
    references=(
        "https://github.com/huggingface/transformers/issues/45482",
        "consumer-llm-patches P5",
    ),
)
