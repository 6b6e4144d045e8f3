"""P12: PEFT LoRA accepts Gemma 4's `Gemma4ClippableLinear` by adapting the Linear inside it."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# Redirect the LoRA layer to the wrapper's inner nn.Linear; the wrapper keeps its clamps.
# The assignment is one line in the target, so its marker sits on the line it adds.
REDIRECT = (
    '_stackpatch_inner = getattr(target, "linear", None) '
    'if type(target).__name__ == "Gemma4ClippableLinear" else None\n',
    "if isinstance(_stackpatch_inner, torch.nn.Linear):\n"
    '    parent, target, target_name = target, _stackpatch_inner, "linear"\n',
)
_DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])


class AdaptLinearInsideClippableLinear(PatchTransform):
    DESCRIPTION = (
        "Let LoraModel wrap the nn.Linear inside Gemma4ClippableLinear instead of refusing."
    )
    SCOPE = ("LoraModel", "_create_and_replace")

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        if self.carries_marker(original_node):
            return updated_node
        body = list(cst.ensure_type(updated_node.body, cst.IndentedBlock).body)
        start = 1 if body and m.matches(body[0], _DOCSTRING) else 0
        self.count_rewrite()
        return updated_node.with_changes(
            body=updated_node.body.with_changes(
                body=[*body[:start], *self._redirect(), *body[start:]]
            )
        )

    def _redirect(self) -> list[cst.BaseStatement]:
        return [self.marked_statement(source) for source in REDIRECT]


PATCH = Patch(
    id="P12",
    slug="peft-gemma4-clippable-linear",
    title="PEFT LoRA accepts the vision tower's Gemma4ClippableLinear",
    package="peft",
    affected=">=0.19.0",
    status=Status.CONFIRMED,
    targets=(Target("peft/tuners/lora/model.py", AdaptLinearInsideClippableLinear),),
    rationale=(
        "Gemma 4's vision (and audio) encoder wraps its projections q_proj/k_proj/v_proj/o_proj "
        "in Gemma4ClippableLinear, an nn.Module holding an nn.Linear plus input/output clamps. "
        "PEFT matches LoRA targets by name, so the usual `target_modules=['q_proj', 'k_proj', "
        "'v_proj', 'o_proj']` on Gemma4ForConditionalGeneration also selects the wrappers, and "
        "LoraModel raises `ValueError: Target module Gemma4ClippableLinear(...) is not "
        "supported`. The patch makes LoraModel adapt the wrapper's inner nn.Linear, so the "
        "clamps stay in force and no other layer type changes. (Whether LoRA belongs in the "
        "vision tower at all is a separate choice: for text-only fine-tuning restrict the "
        "targets to the language model, as the bundled example does.)"
    ),
    references=(
        "axolotl Gemma 4 notes: `Gemma4ClippableLinear not supported` by PEFT",
        "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/model.py",
    ),
    reproducer="validation/p12_peft_clippable_linear.py",
)
