"""P2: MatMul8bitLt.backward reads the int8 weight state its forward used."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `ctx.state = state`: forward hands its live MatmulLtState to backward
_SAVE_STATE = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Attribute(value=m.Name("ctx"), attr=m.Name("state")))],
            value=m.Name("state"),
        )
    ]
)
_IMPORT = m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])


class SnapshotStateForBackward(PatchTransform):
    DESCRIPTION = (
        "Give MatMul8bitLt.backward a shallow copy of the state forward used, so hooks that "
        "reset the module's state in between (accelerate's offload) cannot take SCB away."
    )
    SCOPE = ("MatMul8bitLt", "forward")
    SITES = 2

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if not self.within_scope() or not m.matches(updated_node, _SAVE_STATE):
            return updated_node
        return self.with_value(
            updated_node,
            cst.parse_expression("copy.copy(state)"),
            "backward must see the CB/SCB forward used",
        )

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.rewritten != 1:
            return updated_node
        self.count_rewrite()
        body = list(updated_node.body)
        first_import = next((i for i, s in enumerate(body) if m.matches(s, _IMPORT)), 0)
        body.insert(first_import, self.marked_statement("import copy\n"))
        return updated_node.with_changes(body=body)


PATCH = Patch(
    id="P2",
    slug="int8-backward-keeps-forward-state",
    title="MatMul8bitLt.backward uses the CB/SCB its forward used, not a state hooks cleared",
    package="bitsandbytes",
    affected=">=0.45.0",
    status=Status.CONFIRMED,
    targets=(Target("bitsandbytes/autograd/_functions.py", SnapshotStateForBackward),),
    rationale=(
        "MatMul8bitLt.forward saves the module's live MatmulLtState for backward, which "
        "dequantizes the int8 weight as CB * SCB / 127 for the input gradient. accelerate's "
        "offload hook (AlignDevicesHook.post_forward, accelerate 1.13-1.15) sets "
        "`module.state.SCB = None` on every offloaded Linear8bitLt right after its forward and "
        "leaves CB, so any backward through such a layer (LoRA training) fails with "
        "\"'NoneType' object has no attribute 'unsqueeze'\". Organic path: load_in_8bit with "
        "llm_int8_enable_fp32_cpu_offload and device_map='auto' that offloads layers "
        "(transformers then quantizes the offloaded layers too: P16). The collection's P2 "
        "recomputed SCB from CB, which cannot be right (every CB row is scaled to absmax 127, "
        "so the row scales are gone); this patch instead hands backward a shallow copy of the "
        "state, holding the CB and SCB forward used."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P2",
    ),
    reproducer="validation/p02_int8_backward_after_offload.py",
    # The reproducer trains LoRA on the offloaded layer, which needs P14 on every PEFT.
    requires=("P14",),
)
