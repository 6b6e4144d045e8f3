"""P15: LoRA target_parameters trains on experts that P13 packed to 4 bits, in peft's format."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform, injected_statements

SOURCE = Path(__file__).resolve().parent.parent / "inject" / "packed_experts_lora.py"

# `LoraLayer.__init__(self, base_layer, **kwargs)`: the base layer is known from here on.
_LAYER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(value=m.Name("LoraLayer"), attr=m.Name("__init__"))))]
)
_CHECK = "stackpatch_check_packed_target(self, config, r)\n"
# Method of ParamWrapper -> the statement put first in its body.
_FIRST = {
    "_get_in_out_features": (
        "if (packed_features := stackpatch_in_out_features(self)) is not None:\n"
        "    return packed_features\n"
    ),
    "update_layer": "stackpatch_swap_packed_in_out(self)\n",
    "_activate_lora": (
        "if stackpatch_packed_experts(self) is not None:\n"
        "    with stackpatch_packed_experts_lora(self, active_adapters):\n"
        "        yield\n"
        "    return\n"
    ),
    "merge": "stackpatch_unpack_before_merge(self, adapter_names)\n",
}
_DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])


class LoraOnPackedExperts(PatchTransform):
    DESCRIPTION = (
        "Hook peft's ParamWrapper where it reads the adapted parameter so that LoRA on P13's "
        "packed experts gets peft's own adapters and runs them beside the 4-bit kernel; "
        "append the hooks."
    )
    SCOPE = ("ParamWrapper",)
    SITES = len(_FIRST) + 2  # __init__'s check, the methods above, the appended module

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        body = []
        for statement in cst.ensure_type(updated_node.body, cst.IndentedBlock).body:
            if isinstance(statement, cst.FunctionDef):
                statement = self._hook(statement)
            body.append(statement)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def _hook(self, function: cst.FunctionDef) -> cst.FunctionDef:
        block = cst.ensure_type(function.body, cst.IndentedBlock)
        name = function.name.value
        if name == "__init__":
            return function.with_changes(
                body=self.insert_beside(block, _LAYER_INIT, _CHECK, before=False)
            )
        if name not in _FIRST:
            return function
        statements = list(block.body)
        first = 1 if statements and m.matches(statements[0], _DOCSTRING) else 0
        if first < len(statements) and self.carries_marker(statements[first]):
            return function
        self.count_rewrite()
        statements.insert(first, self.marked_statement(_FIRST[name]))
        return function.with_changes(body=block.with_changes(body=statements))

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.rewritten != self.SITES - 1:
            return updated_node
        self.count_rewrite()
        return updated_node.with_changes(
            body=[*updated_node.body, *injected_statements(self, SOURCE)]
        )


PATCH = Patch(
    id="P15",
    slug="lora-on-packed-experts",
    title="LoRA target_parameters on P13's 4-bit experts: trains packed, saves peft's format",
    package="peft",
    affected=">=0.19.0",
    status=Status.CONFIRMED,
    targets=(Target("peft/tuners/lora/layer.py", LoraOnPackedExperts),),
    requires=("P13",),
    rationale=(
        "With P13 a Gemma 4 MoE loaded with load_in_4bit keeps each layer's fused experts "
        "packed in 4 bits (uint8 bitsandbytes Params4bit): about 22.8 B of 26B-A4B's 25.2 B "
        "parameters. PEFT's target_parameters wraps a parameter in a ParamWrapper that reads "
        "its shape (the packed (N, 1) bytes, not the (E, out, in) weight) and adds the LoRA "
        "delta to the float weight through a torch parametrization; on the packed tensor the "
        "first forward fails inside torch with 'Registering a parametrization may not change "
        "the dtype of the tensor, unless `unsafe` flag is enabled', so expert LoRA needed BF16 "
        "experts (~44 GB for 26B-A4B). The patch hooks ParamWrapper: the adapters are built "
        "from the quant state's logical shape exactly as peft builds them on BF16 experts "
        "(lora_A (r*E, in) expert-major, lora_B (out, r*E) rank-major, same init, scaling, "
        "keys and adapter_config.json), and instead of the parametrization the active "
        "adapters' factors go to P13's experts forward, which runs them per routed row: one "
        "adapter per weight inside its fused 4-bit Triton kernels on a GPU, otherwise as two "
        "low-rank grouped GEMMs beside the 4-bit kernel; no float copy of a weight and no "
        "(E, out, in) delta is ever made, forward or backward. An adapter trained on the "
        "packed model loads with stock peft on BF16 experts and vice versa. merge() first "
        "dequantizes the experts module to BF16 (exact), then peft's own merge adds the "
        "delta, so merge_and_unload returns BF16 experts. lora_dropout, use_dora, "
        "fan_in_fan_out, lora_bias, a rank above one expert's, a 4-bit weight that is not an "
        "expert stack, and peft 0.19.0 (whose expert layout differs from 0.19.1+) are refused "
        "at get_peft_model with one line. Only modules P13 marked are touched."
    ),
    references=(
        "patches/catalog/p13_gemma4_experts_4bit.py",
        "https://github.com/huggingface/peft/pull/3577",
    ),
    reproducer="validation/p15_lora_on_packed_experts.py",
)
