"""P6 (historical): SDPA attention moves the mask to the device of the query."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

from ._device_placement import NOT_REPRODUCED

# `attn_output = torch.nn.functional.scaled_dot_product_attention(...)`
_SDPA_CALL = m.SimpleStatementLine(
    body=[m.Assign(value=m.Call(func=m.Attribute(attr=m.Name("scaled_dot_product_attention"))))]
)
MOVE_MASK = "if attention_mask is not None:\n    attention_mask = attention_mask.to(query.device)\n"


class MoveMaskToQuery(PatchTransform):
    DESCRIPTION = "Move attention_mask to query.device before scaled_dot_product_attention."
    SCOPE = ("sdpa_attention_forward",)

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not self.within_scope():
            return updated_node
        return self.insert_beside(updated_node, _SDPA_CALL, MOVE_MASK, before=True)


PATCH = Patch(
    id="P6",
    slug="sdpa-mask-device",
    title="SDPA attention: the mask moved to the query's device",
    package="transformers",
    affected=">=5.5.0",
    status=Status.HISTORICAL,
    targets=(Target("transformers/integrations/sdpa_attention.py", MoveMaskToQuery),),
    rationale=(
        "The collection's P6 reports scaled_dot_product_attention receiving a mask built on "
        "the CPU for CUDA queries, and moves the mask to query.device before the call (the "
        "only such move in sdpa_attention.py is in its Ascend NPU branch)."
    ),
    historical_reason=NOT_REPRODUCED,
    references=(
        "https://github.com/huggingface/transformers/issues/45482",
        "consumer-llm-patches P6",
    ),
)
