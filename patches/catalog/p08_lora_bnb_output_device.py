"""P8 (historical): PEFT's bitsandbytes LoRA layers add the LoRA output on the base result's
device."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

from ._device_placement import NOT_REPRODUCED

# `result = result + output`, in Linear8bitLt.forward and Linear4bit.forward
_ADD = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Name("result"))],
            value=m.BinaryOperation(
                left=m.Name("result"), operator=m.Add(), right=m.Name("output")
            ),
        )
    ]
)


class AddOutputOnResultDevice(PatchTransform):
    DESCRIPTION = "Move the LoRA output to result.device before adding it (8-bit and 4-bit)."
    SITES = 2

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if self._enclosing[-1:] != ["forward"] or not m.matches(updated_node, _ADD):
            return updated_node
        moved = cst.parse_expression("result + output.to(result.device)")
        return self.with_value(updated_node, moved)


PATCH = Patch(
    id="P8",
    slug="lora-bnb-output-device",
    title="PEFT LoRA on bitsandbytes layers: the LoRA output added on the base result's device",
    package="peft",
    affected=">=0.19.0",
    status=Status.HISTORICAL,
    targets=(Target("peft/tuners/lora/bnb.py", AddOutputOnResultDevice),),
    rationale=(
        "The collection's P8 reports the LoRA delta computed on cuda:0 while the offloaded "
        "INT8 base layer's result is on the CPU, and moves the delta to the result's device "
        "in Linear8bitLt.forward and Linear4bit.forward."
    ),
    historical_reason=NOT_REPRODUCED,
    references=(
        "https://github.com/huggingface/peft/issues/3169",
        "consumer-llm-patches P8",
    ),
)
