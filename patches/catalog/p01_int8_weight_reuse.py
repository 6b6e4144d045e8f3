"""P1 (historical): reuse an already-int8 weight in MatMul8bitLt instead of re-quantizing it."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `state.CB, state.SCB, _ = F.int8_vectorwise_quant(B.to(torch.float16))`
REQUANTIZE = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[
                m.AssignTarget(
                    target=m.Tuple(
                        elements=[
                            m.Element(m.Attribute(value=m.Name("state"), attr=m.Name("CB"))),
                            m.Element(m.Attribute(value=m.Name("state"), attr=m.Name("SCB"))),
                            m.Element(m.Name()),
                        ]
                    )
                )
            ],
            value=m.Call(func=m.Attribute(attr=m.Name("int8_vectorwise_quant"))),
        )
    ]
)


OVERRIDE = (
    'if B.dtype == torch.int8 and getattr(B, "SCB", None) is not None:\n'
    "    state.CB, state.SCB = B, B.SCB\n"
)


class ReuseInt8Weight(PatchTransform):
    DESCRIPTION = (
        "Take CB/SCB from an int8 weight that carries them instead of its re-quantization."
    )
    SCOPE = ("MatMul8bitLt", "forward")

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not self.within_scope():
            return updated_node
        # Added after the quantization, which stays untouched: every new line is marked.
        return self.insert_beside(updated_node, REQUANTIZE, OVERRIDE, before=False)


PATCH = Patch(
    id="P1",
    slug="int8-weight-reuse",
    title="MatMul8bitLt reuses an int8 weight's CB/SCB instead of re-quantizing it",
    package="bitsandbytes",
    affected=">=0.45.0",
    status=Status.HISTORICAL,
    targets=(Target("bitsandbytes/autograd/_functions.py", ReuseInt8Weight),),
    rationale=(
        "When MatMul8bitLt.forward finds no cached CB/SCB in its state it quantizes the weight "
        "B again. If B is already an int8 tensor carrying SCB, that re-quantizes quantized "
        "values. The patch takes CB/SCB from such a B instead."
    ),
    historical_reason=(
        "Linear8bitLt.forward moves CB/SCB from the weight into the state (init_8bit_state) "
        "before it calls bnb.matmul, so MatMul8bitLt never sees an int8 weight with an empty "
        "state on any public code path of bitsandbytes 0.45-0.50; the collection's author found "
        "no organic reproducer on 0.49.x either. Kept for users of the collection, off by default."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P1",
    ),
)
