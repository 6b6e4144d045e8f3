"""P10: text-only Gemma 4 training without `mm_token_type_ids`."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

FUNCTION = "create_causal_mask_mapping"


def _demands_token_types(node: cst.CSTNode) -> bool:
    if not isinstance(node, (cst.SimpleString, cst.ConcatenatedString)):
        return False
    message = node.evaluated_value
    return isinstance(message, str) and "mm_token_type_ids" in message and "required" in message


def _mentions_token_types(test: cst.CSTNode) -> bool:
    return bool(m.findall(test, m.Name("mm_token_type_ids")))


_RAISE = m.Raise(
    exc=m.Call(func=m.Name("ValueError"), args=[m.Arg(m.MatchIfTrue(_demands_token_types))])
)
# `if is_training and mm_token_type_ids is None: raise ValueError("... is required ...")`
GUARD = m.If(
    test=m.MatchIfTrue(_mentions_token_types),
    body=m.OneOf(
        m.IndentedBlock(body=[m.SimpleStatementLine(body=[_RAISE])]),
        m.SimpleStatementSuite(body=[_RAISE]),
    ),
    orelse=None,
)
# Any raise guarded on mm_token_type_ids: if one is left, upstream has not removed the check.
ANY_GUARD = m.If(
    test=m.MatchIfTrue(_mentions_token_types),
    body=m.MatchIfTrue(lambda body: bool(m.findall(body, m.Raise()))),
)


class DropMmTokenTypeIdsTrainingGuard(PatchTransform):
    DESCRIPTION = (
        f"Remove the raise in {FUNCTION} that demands mm_token_type_ids whenever the model trains."
    )
    SCOPE = (FUNCTION,)

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        body = list(updated_node.body.body)
        for index, statement in enumerate(body):
            if not m.matches(statement, GUARD) or index + 1 == len(body):
                continue
            guard = cst.ensure_type(statement, cst.If)
            following = body[index + 1]
            # The removed guard leaves no line behind, so the marker goes where it stood.
            marker = self.marker_line("text-only batches need no mm_token_type_ids; raise removed")
            body[index + 1] = following.with_changes(
                leading_lines=[*guard.leading_lines, marker, *following.leading_lines]
            )
            del body[index]
            self.count_rewrite()
            return updated_node.with_changes(body=updated_node.body.with_changes(body=body))
        return updated_node

    def is_fixed_upstream(self, module: cst.Module) -> bool:
        functions = self.scope_nodes(module)
        return bool(functions) and not any(m.findall(f, ANY_GUARD) for f in functions)


PATCH = Patch(
    id="P10",
    slug="text-only-training-without-mm-token-type-ids",
    title="Gemma 4 trains on text-only batches without mm_token_type_ids",
    package="transformers",
    affected=">=5.5.0,<5.6.0",
    status=Status.UPSTREAMABLE,
    targets=(
        Target("transformers/models/gemma4/modeling_gemma4.py", DropMmTokenTypeIdsTrainingGuard),
    ),
    rationale=(
        "In transformers 5.5.x, create_causal_mask_mapping raises ValueError whenever the model "
        "is in training mode and no mm_token_type_ids are passed. The mapping is only built for "
        "checkpoints whose text config uses bidirectional attention for vision tokens (the larger "
        "Gemma 4 models), so text-only fine-tuning of those models fails on its first step. A "
        "batch without image tokens needs no token-type mask: the plain causal and sliding masks "
        "are correct. transformers 5.6.0 removed the raise; this patch removes it in 5.5.x."
    ),
    references=(
        "https://github.com/huggingface/transformers/issues/45482",
        "consumer-llm-patches P10",
    ),
    reproducer="validation/p10_text_only_training.py",
)
