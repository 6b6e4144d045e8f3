"""P16: with device_map="auto", bitsandbytes leaves the layers it offloads unquantized."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

SOURCE = Path(__file__).resolve().parent.parent / "inject" / "offload_unquantized.py"

# `device_map = _get_device_map(model, device_map, max_memory, hf_quantizer)`
_RESOLVE_DEVICE_MAP = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Name("device_map"))],
            value=m.Call(func=m.Name("_get_device_map")),
        )
    ]
)
_CALL = "stackpatch_keep_offloaded_modules_unquantized(model, device_map, hf_quantizer, dtype)\n"


class KeepOffloadedModulesUnquantized(PatchTransform):
    DESCRIPTION = (
        "Once from_pretrained has resolved the device map, swap the bitsandbytes placeholders "
        "of offloaded modules back to float ones (llm_int8_enable_fp32_cpu_offload)."
    )
    SCOPE = ("PreTrainedModel", "from_pretrained")
    SITES = 2

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not self.within_scope():
            return updated_node
        return self.insert_beside(updated_node, _RESOLVE_DEVICE_MAP, _CALL, before=False)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        return self.with_injected(updated_node, SOURCE)


PATCH = Patch(
    id="P16",
    slug="offloaded-layers-stay-unquantized",
    title="load_in_8bit/4bit with device_map='auto' keeps offloaded layers unquantized",
    package="transformers",
    affected=">=5.5.0",
    status=Status.CONFIRMED,
    targets=(Target("transformers/modeling_utils.py", KeepOffloadedModulesUnquantized),),
    rationale=(
        "A 24 GB card cannot hold 26B-A4B even in 4 bits with activations, so users load it "
        "with device_map='auto', a max_memory budget and "
        "BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True), which promises that the "
        "modules placed on 'cpu' or 'disk' stay unquantized. The bitsandbytes quantizers "
        "collect those modules in preprocess_model, before from_pretrained resolves 'auto' "
        "into a dict, so they find none and quantize the offloaded layers as well; accelerate "
        "cannot offload bitsandbytes weights: with load_in_4bit the first forward fails "
        "('Cannot copy out of meta tensor; no data!', the quant state waits on the meta "
        "device), with load_in_8bit the first backward fails (P2), and on a CPU-only machine "
        "loading fails. A dict device_map works, which hid the bug. The patch swaps the "
        "placeholders of offloaded modules (and P13's packed experts) back to float ones "
        "right after the map is resolved, while the model is still on the meta device."
    ),
    references=(
        "https://github.com/huggingface/transformers/blob/v5.23.0/src/transformers/quantizers/quantizer_bnb_4bit.py",
    ),
    reproducer="validation/p16_auto_offload_quantized.py",
    # The reproducer trains LoRA on the offloaded layers, which needs P14 on every PEFT.
    requires=("P14",),
)
