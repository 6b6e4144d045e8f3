"""P13: Gemma 4 MoE experts quantized to 4-bit at load time and run packed with grouped GEMM."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform, injected_statements

INJECT = Path(__file__).resolve().parent.parent / "inject"
SOURCES = (
    INJECT / "experts_4bit_triton.py",
    INJECT / "whole_block_rows.py",
    INJECT / "experts_4bit.py",
    INJECT / "bnb_experts_hooks.py",
)

# `if issubclass(module.source_cls, Conv1D):` — only Linear4bit replacements have source_cls.
_SOURCE_CLS_TEST = m.Call(
    func=m.Name("issubclass"),
    args=[
        m.Arg(m.Attribute(value=m.Name("module"), attr=m.Name("source_cls"))),
        m.Arg(m.Name("Conv1D")),
    ],
)


class QuantizeExpertsInBnbIntegration(PatchTransform):
    DESCRIPTION = (
        "Let Bnb4bitQuantize quantize modules without source_cls and append the 4-bit experts "
        "implementation, its loading hooks and its registration."
    )
    SITES = 2

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        if self._enclosing != ["Bnb4bitQuantize", "convert"]:
            return updated_node
        if not m.matches(updated_node.test, _SOURCE_CLS_TEST):
            return updated_node
        self.count_rewrite()
        test = cst.parse_expression(
            'issubclass(getattr(module, "source_cls", type(module)), Conv1D)'
        )
        body = updated_node.body.with_changes(
            header=self.trailing_marker(existing=updated_node.body.header)
        )
        return updated_node.with_changes(test=test, body=body)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.carries_marker(original_node) or self.rewritten != 1:
            return updated_node
        self.count_rewrite()
        registration = self.marked_statement("stackpatch_register_experts_4bit()\n")
        injected = [*injected_statements(self, *SOURCES), registration]
        return updated_node.with_changes(body=[*updated_node.body, *injected])


_CALL_PREPARE = (
    "from ..integrations.bitsandbytes import stackpatch_prepare_experts_4bit\n",
    "self._stackpatch_packed_experts = stackpatch_prepare_experts_4bit(\n"
    "    model, self.modules_to_not_convert, self.quantization_config\n"
    ")\n",
)
_CALL_NEEDS = (
    "from ..integrations.bitsandbytes import stackpatch_experts_needs_quantization\n",
    "if stackpatch_experts_needs_quantization(model, param_name):\n    return True\n",
)
_CALL_SERIALIZABLE = (
    "from ..integrations.bitsandbytes import stackpatch_experts_block_saving\n",
    "if stackpatch_experts_block_saving(self):\n    return False\n",
)
_CALL_DEQUANTIZE = (
    "from ..integrations.bitsandbytes import stackpatch_dequantize_experts\n",
    "stackpatch_dequantize_experts(model, dtype)\n",
    "self._stackpatch_packed_experts = 0\n",
)
# Method of Bnb4BitHfQuantizer -> (put the hook first?, the hook's statements).
_HOOKS = {
    "param_needs_quantization": (True, _CALL_NEEDS),
    "_process_model_before_weight_loading": (False, _CALL_PREPARE),
    "is_serializable": (True, _CALL_SERIALIZABLE),
    "_dequantize": (True, _CALL_DEQUANTIZE),
}


class QuantizeExpertsInBnb4bitQuantizer(PatchTransform):
    DESCRIPTION = (
        "Hook the 4-bit quantizer: prepare experts modules before loading, report their fused "
        "parameters as needing quantization, refuse to serialize packed experts, and "
        "dequantize them in model.dequantize()."
    )
    SCOPE = ("Bnb4BitHfQuantizer",)
    SITES = len(_HOOKS)

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        if self.carries_marker(original_node):
            return updated_node
        body = []
        for statement in cst.ensure_type(updated_node.body, cst.IndentedBlock).body:
            if isinstance(statement, cst.FunctionDef) and statement.name.value in _HOOKS:
                first, sources = _HOOKS[statement.name.value]
                statement = self._insert(statement, sources, first)
            body.append(statement)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def _insert(
        self, function: cst.FunctionDef, sources: tuple[str, ...], first: bool
    ) -> cst.FunctionDef:
        self.count_rewrite()
        body = cst.ensure_type(function.body, cst.IndentedBlock)
        hook = [self.marked_statement(source) for source in sources]
        statements = [*hook, *body.body] if first else [*body.body, *hook]
        return function.with_changes(body=body.with_changes(body=statements))


PATCH = Patch(
    id="P13",
    slug="gemma4-experts-4bit",
    title="Gemma 4 MoE experts quantized to 4-bit at load time (load_in_4bit)",
    package="transformers",
    affected=">=5.5.0",
    status=Status.UPSTREAMABLE,
    targets=(
        Target("transformers/integrations/bitsandbytes.py", QuantizeExpertsInBnbIntegration),
        Target("transformers/quantizers/quantizer_bnb_4bit.py", QuantizeExpertsInBnb4bitQuantizer),
    ),
    rationale=(
        "Gemma4TextExperts keeps each layer's 128 experts as two fused 3D nn.Parameter tensors. "
        "Under BitsAndBytesConfig(load_in_4bit=True) transformers replaces only nn.Linear with "
        "Linear4bit, so the experts stay BF16: 26B-A4B needs ~46 GB instead of ~14. This patch "
        "puts the fused expert tensors on transformers' own 4-bit loading path: the quantizer "
        "marks them as needing quantization (honouring quant type, double quantization, quant "
        "storage and llm_int8_skip_modules), Bnb4bitQuantize packs each one as it is loaded, "
        "and a 'bnb_4bit' experts implementation registered in transformers' ExpertsInterface "
        "runs them: on a GPU with Triton a fused 4-bit grouped GEMM decodes the packed weights "
        "in registers (no BF16 copy, forward or backward); elsewhere it dequantizes a chunk of "
        "experts at a time (256 MiB by default), runs grouped GEMM over the tokens routed to "
        "them, and dequantizes again in backward. model.dequantize() turns the experts back "
        "into BF16 Parameters (which save and reload); save_pretrained on the packed model "
        "refuses, with a warning that says to save the LoRA adapter or dequantize first, "
        "because the packed layout cannot be loaded back. LoRA on the experts (peft "
        "target_parameters) needs float weights: keep them BF16 with "
        "llm_int8_skip_modules=['experts']."
    ),
    references=(
        "unsloth PR 'gemma-4 moe: per-expert Linear4bit swap so 26B-A4B fits at 4-bit': "
        "https://github.com/unslothai/unsloth/pull/5432",
        "bench/results/moe_experts.md",
    ),
    reproducer="validation/p13_gemma4_experts_4bit.py",
)
