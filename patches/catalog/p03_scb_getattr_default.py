"""P3 (historical): Linear8bitLt saves its state dict when the weight has no SCB attribute."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `getattr(self.weight, scb_name)` with no default
_GETATTR_WEIGHT = m.Call(
    func=m.Name("getattr"),
    args=[m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("weight"))), m.Arg()],
)
_GETATTR_WEIGHT_WITH_DEFAULT = m.Call(
    func=m.Name("getattr"),
    args=[m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("weight"))), m.Arg(), m.Arg()],
)


class DefaultMissingScb(PatchTransform):
    DESCRIPTION = "Read the weight's SCB with getattr(..., None) when saving a Linear8bitLt."
    SCOPE = ("Linear8bitLt", "_save_to_state_dict")

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if not self.within_scope():
            return updated_node
        if not m.matches(
            updated_node, m.SimpleStatementLine(body=[m.Assign(value=_GETATTR_WEIGHT)])
        ):
            return updated_node
        assign = cst.ensure_type(updated_node.body[0], cst.Assign)
        call = cst.ensure_type(assign.value, cst.Call)
        first, second = call.args
        # The space before `)` belongs to the last argument; it moves to the new one.
        default = cst.Arg(cst.Name("None"), whitespace_after_arg=second.whitespace_after_arg)
        second = second.with_changes(
            comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")),
            whitespace_after_arg=cst.SimpleWhitespace(""),
        )
        return self.with_value(updated_node, call.with_changes(args=[first, second, default]))

    def is_fixed_upstream(self, module: cst.Module) -> bool:
        return any(
            m.findall(node, _GETATTR_WEIGHT_WITH_DEFAULT) for node in self.scope_nodes(module)
        )


PATCH = Patch(
    id="P3",
    slug="scb-getattr-default",
    title="Linear8bitLt state_dict tolerates a weight without SCB",
    package="bitsandbytes",
    affected="<0.50.0",
    status=Status.HISTORICAL,
    targets=(Target("bitsandbytes/nn/modules.py", DefaultMissingScb),),
    rationale=(
        "Linear8bitLt._save_to_state_dict reads `getattr(self.weight, scb_name)` without a "
        "default. When the weight is not an Int8Params carrying SCB (a weight re-created on the "
        "meta device or swapped for a plain Parameter by offloading hooks), state_dict() raises "
        "AttributeError, so saving a checkpoint or an adapter fails. The code right after "
        "already handles a missing weight SCB by falling back to the state's SCB. bitsandbytes "
        "0.50.0 added the None default; this patch adds it to older releases."
    ),
    historical_reason=(
        "The collection claimed it confirmed; no organic path to it was found. Int8Params sets "
        "an SCB attribute in __new__ (None when unknown), and accelerate re-creates offloaded "
        "weights as Int8Params with their attributes, so getattr finds SCB. Tried on "
        "transformers 5.5.4 / bitsandbytes 0.49.2 (CPU, P11 applied): an all-CPU 8-bit load "
        "(state_dict and PEFT save_pretrained work) and 'disk' layers (left unquantized); on "
        "the GPU, INT8 layers that device_map='auto' offloads (P16's bug) failed in backward "
        "(P2), not in saving, on bitsandbytes 0.50.2, which already has the default. "
        "bitsandbytes 0.50.0 added the default upstream. Off by default until a reproducer "
        "shows the AttributeError."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P3",
    ),
)
