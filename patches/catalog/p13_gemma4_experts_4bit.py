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
    INJECT / "experts_4bit_checkpoint.py",
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
    "from ..integrations.bitsandbytes import stackpatch_prepare_experts_checkpoint\n",
    'stackpatch_prepare_experts_checkpoint(model, self, kwargs.get("checkpoint_files"))\n',
)
_CALL_NEEDS = (
    "from ..integrations.bitsandbytes import stackpatch_experts_needs_quantization\n",
    "if stackpatch_experts_needs_quantization(model, param_name):\n    return True\n",
)
_CALL_STRIP_GUARD = (
    "from ..integrations.bitsandbytes import stackpatch_strip_checkpoint_guard\n",
    "stackpatch_strip_checkpoint_guard(self.quantization_config)\n",
)
_CALL_AFTER_LOADING = (
    "from ..integrations.bitsandbytes import stackpatch_finish_experts_loading\n",
    "stackpatch_finish_experts_loading(self, model)\n",
)
_CALL_DEQUANTIZE = (
    "from ..integrations.bitsandbytes import stackpatch_dequantize_experts\n",
    "stackpatch_dequantize_experts(model, dtype)\n",
    "self._stackpatch_packed_experts = 0\n",
)
# Method of Bnb4BitHfQuantizer -> (statements put first, statements put last).
_HOOKS = {
    "param_needs_quantization": (_CALL_NEEDS, ()),
    "_process_model_before_weight_loading": (_CALL_STRIP_GUARD, _CALL_PREPARE),
    "_process_model_after_weight_loading": (_CALL_AFTER_LOADING, ()),
    "_dequantize": (_CALL_DEQUANTIZE, ()),
}


_CONVERSIONS = "stackpatch_experts_weight_conversions"
_IMPORT_CONVERSIONS = f"from ..integrations.bitsandbytes import {_CONVERSIONS}\n"
# transformers 5.23 moved the quantizer's converter into HfQuantizer.get_weight_conversions
# (built from `serialized_names`); before, Bnb4BitHfQuantizer defines its own.
_GET_WEIGHT_CONVERSIONS = (
    "def get_weight_conversions(self):\n"
    f"    {_IMPORT_CONVERSIONS}"
    f"    return {_CONVERSIONS}(self, super().get_weight_conversions())\n"
)


class QuantizeExpertsInBnb4bitQuantizer(PatchTransform):
    DESCRIPTION = (
        "Hook the 4-bit quantizer: prepare experts modules before loading (and check a "
        "pre-quantized checkpoint's packed experts), report their fused parameters as needing "
        "quantization, add converters that load packed experts with their quant state, forget "
        "the irreversible deserialization converters after loading, and dequantize packed "
        "experts in model.dequantize()."
    )
    SCOPE = ("Bnb4BitHfQuantizer",)
    SITES = len(_HOOKS) + 1  # and get_weight_conversions

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        if self.carries_marker(original_node):
            return updated_node
        body = []
        conversions_found = False
        for statement in cst.ensure_type(updated_node.body, cst.IndentedBlock).body:
            if isinstance(statement, cst.FunctionDef) and statement.name.value in _HOOKS:
                first, last = _HOOKS[statement.name.value]
                statement = self._insert(statement, first, last)
            elif m.matches(statement, m.FunctionDef(name=m.Name("get_weight_conversions"))):
                statement = self._wrap_returns(cst.ensure_type(statement, cst.FunctionDef))
                conversions_found = True
            body.append(statement)
        if not conversions_found:
            self.count_rewrite()
            method = self.marked_statement(_GET_WEIGHT_CONVERSIONS)
            body.append(method.with_changes(leading_lines=[cst.EmptyLine(indent=False)]))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def _insert(
        self, function: cst.FunctionDef, first: tuple[str, ...], last: tuple[str, ...]
    ) -> cst.FunctionDef:
        self.count_rewrite()
        body = cst.ensure_type(function.body, cst.IndentedBlock)
        before = [self.marked_statement(source) for source in first]
        after = [self.marked_statement(source) for source in last]
        return function.with_changes(body=body.with_changes(body=[*before, *body.body, *after]))

    def _wrap_returns(self, function: cst.FunctionDef) -> cst.FunctionDef:
        """`return X` -> `return stackpatch_experts_weight_conversions(self, X)`."""
        self.count_rewrite()
        function = cst.ensure_type(function.visit(_WrapReturns(self)), cst.FunctionDef)
        body = cst.ensure_type(function.body, cst.IndentedBlock)
        statements = [self.marked_statement(_IMPORT_CONVERSIONS), *body.body]
        return function.with_changes(body=body.with_changes(body=statements))


class _WrapReturns(cst.CSTTransformer):
    """Wraps the value of every return statement of one function (not of nested ones)."""

    def __init__(self, transform: PatchTransform) -> None:
        self.transform = transform
        self.depth = 0

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.depth += 1
        return self.depth == 1

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        self.depth -= 1
        return updated_node

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        statement = updated_node.body[0]
        if not isinstance(statement, cst.Return) or statement.value is None:
            return updated_node
        value = cst.Call(
            func=cst.Name(_CONVERSIONS),
            args=[cst.Arg(cst.Name("self")), cst.Arg(statement.value)],
        )
        trailing = self.transform.trailing_marker(existing=updated_node.trailing_whitespace)
        return updated_node.with_changes(
            body=[statement.with_changes(value=value)], trailing_whitespace=trailing
        )


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
        "into BF16 Parameters. save_pretrained writes packed experts in bitsandbytes' own "
        "serialization: the packed tensor under the parameter's name and the entries of "
        "QuantState.as_dict(packed=True) beside it (absmax, quant_map, nested_absmax, "
        "nested_quant_map, quant_state.bitsandbytes__nf4 or __fp4), as a Linear4bit writes its "
        "weight. from_pretrained of such a checkpoint rebuilds them with "
        "Params4bit.from_prequantized on the device the bytes are read to: no re-quantization "
        "and no float copy of an expert; it first checks every packed expert's entries in the "
        "safetensors headers, so a truncated or damaged shard fails in one line. The saved "
        "llm_int8_skip_modules (the modules really left unquantized) starts with an entry that "
        "unpatched transformers cannot compile as a regular expression, whose error says the "
        "checkpoint needs P13 (without it transformers 5.5-5.22 loads the packed bytes into the "
        "BF16 parameters and fails at the first forward, 5.23 with an unexplained size "
        "mismatch); P13 removes it before transformers reads the list. After loading, the "
        "4-bit deserialization converters are dropped from the conversions transformers keeps "
        "for saving: it cannot reverse them, and stock save_pretrained of any reloaded 4-bit "
        "model raises NotImplementedError. LoRA on the experts (peft target_parameters) trains "
        "on the packed experts with P15."
    ),
    references=(
        "unsloth PR 'gemma-4 moe: per-expert Linear4bit swap so 26B-A4B fits at 4-bit': "
        "https://github.com/unslothai/unsloth/pull/5432",
        "bench/results/moe_experts.md",
        "unsloth-zoo PR 'Load prequantized bnb 4-bit MoE expert checkpoints under transformers "
        "v5' (#856): the same key layout for fused experts",
        "bench/quantized_checkpoint.py: the 26B-A4B 4-bit checkpoint against quantizing on load",
    ),
    reproducer="validation/p13_gemma4_experts_4bit.py",
)
