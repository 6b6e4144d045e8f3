"""P18: Gemma 4's text rotary embedding registers its buffers in hash-seed order."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

_LAYER_TYPES = m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("layer_types")))
# `self.layer_types = set(config.layer_types)`: iterated to register one pair of buffers each.
_SET_OF_LAYER_TYPES = m.SimpleStatementLine(
    body=[m.Assign(targets=[_LAYER_TYPES], value=m.Call(func=m.Name("set")))]
)
# Upstream's fix (transformers 5.16): `sorted(set(config.layer_types))`.
_SORTED_LAYER_TYPES = m.SimpleStatementLine(
    body=[m.Assign(targets=[_LAYER_TYPES], value=m.Call(func=m.Name("sorted")))]
)


class SortRotaryLayerTypes(PatchTransform):
    DESCRIPTION = (
        "Iterate the rotary embedding's layer types in sorted order, so its inv_freq buffers "
        "are registered in the same order in every process."
    )
    SCOPE = ("Gemma4TextRotaryEmbedding", "__init__")

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if not self.within_scope() or not m.matches(updated_node, _SET_OF_LAYER_TYPES):
            return updated_node
        assign = cst.ensure_type(updated_node.body[0], cst.Assign)
        sorted_call = cst.Call(func=cst.Name("sorted"), args=[cst.Arg(assign.value)])
        return self.with_value(updated_node, sorted_call)

    def is_fixed_upstream(self, module: cst.Module) -> bool:
        return any(m.findall(node, _SORTED_LAYER_TYPES) for node in self.scope_nodes(module))


PATCH = Patch(
    id="P18",
    slug="gemma4-rotary-buffer-order",
    title="Gemma 4's rotary buffers keep one order in every process, so DDP does not scramble them",
    package="transformers",
    affected=">=5.5.0,<5.16.0",
    status=Status.UPSTREAMABLE,
    targets=(Target("transformers/models/gemma4/modeling_gemma4.py", SortRotaryLayerTypes),),
    rationale=(
        "Gemma4TextRotaryEmbedding.__init__ registers a {layer_type}_inv_freq and "
        "{layer_type}_original_inv_freq buffer per attention type while iterating "
        "set(config.layer_types): the order of a set of strings depends on the interpreter's "
        "hash seed, which differs between processes. DistributedDataParallel broadcasts rank "
        "0's buffers when it wraps the model (and before every forward under its default "
        "broadcast_buffers=True): the buffers travel as one flat tensor laid "
        "out in rank 0's order and are cut up in the receiving rank's order. Whenever a rank's "
        "order differs from rank 0's (for Gemma 4's two attention types: half the time), its "
        "full-attention frequencies (16 values in the tiny model, 256 in 26B-A4B) and "
        "sliding-attention frequencies (8 / 128) are overwritten with slices of each other and "
        "with zeros: that rank trains with wrong rotary position embeddings, silently, and its "
        "gradients are averaged into every rank's step. On CPU with the tiny MoE model the first "
        "step's gradient norm came out 2.14 on one process and 2.15, 2.31 or 2.75 on two ranks "
        "from run to run. transformers 5.16 iterates sorted(set(...)); the patch does the same "
        "in 5.5 to 5.15."
    ),
    references=(
        "https://github.com/huggingface/transformers/blob/v5.15.1/src/transformers/models/gemma4/modeling_gemma4.py",
        "https://github.com/huggingface/transformers/blob/v5.16.1/src/transformers/models/gemma4/modeling_gemma4.py",
    ),
    reproducer="validation/p18_gemma4_rotary_buffers_under_ddp.py",
)
