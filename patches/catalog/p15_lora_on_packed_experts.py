"""P15: LoRA on experts that P13 packed to 4 bits says what to do instead of failing obscurely."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `LoraLayer.__init__(self, base_layer, **kwargs)`: the base layer is known from here on.
_LAYER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(value=m.Name("LoraLayer"), attr=m.Name("__init__"))))]
)
REFUSE_PACKED_EXPERTS = (
    'if getattr(self.get_base_layer(), "_stackpatch_4bit_experts", False):\n'
    "    raise ValueError(\n"
    '        f"LoRA target_parameters cannot wrap {parameter_name!r}: stackpatch P13 packed "\n'
    '        "these MoE experts to 4 bits, and LoRA on a parameter needs its float weights. "\n'
    "        \"Load the model with BitsAndBytesConfig(..., llm_int8_skip_modules=['experts']) \"\n"
    '        "to keep the experts in BF16 (LoRA on them then works), or leave the experts "\n'
    '        "out of target_parameters."\n'
    "    )\n"
)


class RefusePackedExperts(PatchTransform):
    DESCRIPTION = (
        "Refuse, with the fix in the message, a LoRA ParamWrapper on experts whose fused "
        "parameters P13 packed to 4 bits."
    )
    SCOPE = ("ParamWrapper", "__init__")

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        block = cst.ensure_type(updated_node.body, cst.IndentedBlock)
        body = self.insert_beside(block, _LAYER_INIT, REFUSE_PACKED_EXPERTS, before=False)
        return updated_node.with_changes(body=body)


PATCH = Patch(
    id="P15",
    slug="lora-on-packed-experts",
    title="LoRA target_parameters on P13's 4-bit experts: a clear error instead of a dtype failure",
    package="peft",
    affected=">=0.19.0",
    status=Status.CONFIRMED,
    targets=(Target("peft/tuners/lora/layer.py", RefusePackedExperts),),
    requires=("P13",),
    rationale=(
        "With P13 a Gemma 4 MoE loaded with load_in_4bit keeps each layer's fused experts "
        "packed in 4 bits (uint8 bitsandbytes Params4bit). PEFT's target_parameters wraps a "
        "parameter in a ParamWrapper that adds the LoRA delta to the float weight through a "
        "torch parametrization; on the packed tensor that fails inside torch with 'Registering "
        "a parametrization may not change the dtype of the tensor, unless `unsafe` flag is "
        "enabled', which names neither the experts nor a way out. LoRA directly on the packed "
        "experts would need a 4-bit-aware ParamWrapper (the delta added inside the fused "
        "kernel); until then this patch refuses at ParamWrapper creation with an error that "
        "says what works: keep the experts in BF16 with llm_int8_skip_modules=['experts'] "
        "(tested; the training example's --lora-experts does it), or leave them out of "
        "target_parameters. It only acts on modules P13 marked, so stock models and P13's "
        "dequantized experts are untouched."
    ),
    references=("patches/catalog/p13_gemma4_experts_4bit.py",),
    reproducer="validation/p15_lora_on_packed_experts.py",
)
