"""P14: LoRA on layers that accelerate offloads (CPU or disk) trains instead of failing."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `target_device = device if device is not None else base_layer_device`
_TARGET_DEVICE = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(target=m.Name("target_device"))],
            value=m.IfExp(orelse=m.Name("base_layer_device")),
        )
    ]
)
# An offloaded base layer's weight sits on the meta device between forwards; its adapter must
# live where accelerate runs the layer (None when unknown: the adapter then stays where made).
EXECUTION_DEVICE = (
    'if target_device is not None and torch.device(target_device).type == "meta":\n'
    '    hook = getattr(base_layer, "_hf_hook", None)\n'
    '    hooks = getattr(hook, "hooks", [hook])\n'
    '    devices = [getattr(h, "execution_device", None) for h in hooks]\n'
    "    target_device = next((d for d in devices if d is not None), None)\n"
)


class PlaceAdapterOnExecutionDevice(PatchTransform):
    DESCRIPTION = (
        "Move a new adapter to accelerate's execution device, not to the meta device, when its "
        "base layer is offloaded."
    )
    SCOPE = ("BaseTunerLayer", "_move_adapter_to_device_of_base_layer")

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        block = cst.ensure_type(updated_node.body, cst.IndentedBlock)
        body = self.insert_beside(block, _TARGET_DEVICE, EXECUTION_DEVICE, before=False)
        return updated_node.with_changes(body=body)


# `if not any(p.device == meta for p in module.parameters()):` guarding `module.to(weight.device)`
_WEIGHT_DEVICE = m.Attribute(value=m.Name("weight"), attr=m.Name("device"))
_MOVE_TO_WEIGHT = m.If(
    test=m.UnaryOperation(operator=m.Not(), expression=m.Call(func=m.Name("any"))),
    body=m.IndentedBlock(
        body=[
            m.SimpleStatementLine(
                body=[
                    m.Expr(
                        m.Call(
                            func=m.Attribute(value=m.Name("module"), attr=m.Name("to")),
                            args=[m.Arg(_WEIGHT_DEVICE)],
                        )
                    )
                ]
            )
        ]
    ),
)


class KeepAdapterOffMetaDevice(PatchTransform):
    DESCRIPTION = "Do not send a new adapter to its base layer's device when that is meta."
    SCOPE = ("LoraModel", "_replace_module")

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        if not self.within_scope() or not m.matches(updated_node, _MOVE_TO_WEIGHT):
            return updated_node
        self.count_rewrite()
        test = cst.BooleanOperation(
            left=cst.parse_expression("weight.device != meta"),
            operator=cst.And(),
            right=updated_node.test,
        )
        body = updated_node.body.with_changes(
            header=self.trailing_marker(existing=updated_node.body.header)
        )
        return updated_node.with_changes(test=test, body=body)


PATCH = Patch(
    id="P14",
    slug="lora-on-offloaded-layers",
    title="LoRA on layers offloaded by accelerate (CPU/disk) trains instead of failing",
    package="peft",
    affected=">=0.19.0",
    status=Status.CONFIRMED,
    targets=(
        Target("peft/tuners/tuners_utils.py", PlaceAdapterOnExecutionDevice),
        Target("peft/tuners/lora/model.py", KeepAdapterOffMetaDevice),
    ),
    rationale=(
        'With a device_map that offloads layers ("cpu" next to a GPU, or "disk"), accelerate '
        "keeps those layers' weights on the meta device and loads them for each forward. PEFT "
        "places a new LoRA adapter on its base layer's device, twice (BaseTunerLayer."
        "_move_adapter_to_device_of_base_layer and LoraModel._replace_module), so adapters of "
        "offloaded layers become meta tensors: the loss is NaN and backward fails with "
        "'Function MmBackward0 returned an invalid gradient at index 1 - expected device meta "
        "but got cpu' (cuda:0 on a GPU). This is why the consumer-llm-patches example limits "
        "LoRA to the GPU-resident layers. The patch puts such adapters on the device accelerate "
        "executes the layer on and keeps LoraModel from moving them to meta; the adapters are "
        "small and stay resident while the base weights keep streaming."
    ),
    references=(
        "../shared/research/README.md, 'CPU offload and multi-GPU split on a real GPU'",
        "consumer-llm-patches example: layers_to_transform limited to the first 20 layers",
    ),
    reproducer="validation/p14_lora_on_offloaded_layers.py",
)
