"""P20: from_pretrained deep-copies a weight converter for every checkpoint key it matches."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

# `new_converter = deepcopy(pattern_to_converter[source_pattern])`
_COPY = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Call(func=m.Name("deepcopy"), args=[m.Arg(m.Subscript())]),
        )
    ]
)
# `mapping = param_name_to_load.setdefault(renamed_key, new_converter)`
_KEEP_FIRST = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Call(
                func=m.Attribute(value=m.Name(), attr=m.Name("setdefault")),
                args=[m.Arg(), m.Arg(m.Name())],
            ),
        )
    ]
)


def _assign(line: cst.SimpleStatementLine) -> cst.Assign:
    return cst.ensure_type(line.body[0], cst.Assign)


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


class CopyConverterPerTarget(PatchTransform):
    DESCRIPTION = (
        "Deep-copy a WeightConverter only for the first checkpoint key of each target "
        "parameter, the one copy setdefault keeps, not for every key it matches."
    )
    SCOPE = ("convert_and_load_state_dict_in_model",)

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not self.within_scope():
            return updated_node
        body = list(updated_node.body)
        for index in range(len(body) - 1):
            copy, keep = body[index], body[index + 1]
            if not (m.matches(copy, _COPY) and m.matches(keep, _KEEP_FIRST)):
                continue
            copied = _code(cst.ensure_type(_assign(copy).targets[0].target, cst.Name))
            call = cst.ensure_type(_assign(keep).value, cst.Call)
            if _code(call.args[1].value) != copied:
                continue
            self.count_rewrite()
            mapping = _code(_assign(keep).targets[0].target)
            table = _code(cst.ensure_type(call.func, cst.Attribute).value)
            key = _code(call.args[0].value)
            source = (
                f"{mapping} = {table}.get({key})\n"
                f"if {mapping} is None:\n"
                f"    {mapping} = {table}.setdefault({key}, {_code(_assign(copy).value)})\n"
            )
            lookup, only_first = (self.marked_statement(line) for line in source.split("\n", 1))
            # Comments stay: the copy line's on the lookup, upstream's "each target key gets its
            # own converter instance" above the `if`, the setdefault line's on the new one.
            lookup = cst.ensure_type(lookup, cst.SimpleStatementLine).with_changes(
                leading_lines=copy.leading_lines,
                trailing_whitespace=self.trailing_marker(existing=copy.trailing_whitespace),
            )
            only_first = cst.ensure_type(only_first, cst.If)
            inner = cst.ensure_type(only_first.body, cst.IndentedBlock)
            setdefault = cst.ensure_type(inner.body[0], cst.SimpleStatementLine).with_changes(
                trailing_whitespace=self.trailing_marker(existing=keep.trailing_whitespace)
            )
            only_first = only_first.with_changes(
                leading_lines=keep.leading_lines, body=inner.with_changes(body=[setdefault])
            )
            body[index : index + 2] = [lookup, only_first]
            return updated_node.with_changes(body=body)
        return updated_node


PATCH = Patch(
    id="P20",
    slug="converter-copied-per-target",
    title="from_pretrained copies a weight converter per parameter, not per checkpoint key",
    package="transformers",
    affected=">=5.5.0",
    status=Status.UPSTREAMABLE,
    targets=(Target("transformers/core_model_loading.py", CopyConverterPerTarget),),
    rationale=(
        "convert_and_load_state_dict_in_model deep-copies the WeightConverter a checkpoint key "
        "matches (`new_converter = deepcopy(pattern_to_converter[source_pattern])`) and then "
        "keeps it only if the key's target parameter has none yet "
        "(`param_name_to_load.setdefault(renamed_key, new_converter)`): every key after the "
        "first of a target pays for a copy that is thrown away. A bitsandbytes 4-bit "
        "checkpoint has six keys per Linear4bit (the packed weight and its quant-state "
        "entries), each matched by the 4-bit deserialization converter, so loading one copies "
        "its converters about once per tensor: 203,520 deepcopy calls and 2.97 s of a 12.5 s "
        "profiled load of the 26B-A4B 4-bit checkpoint on an H200 "
        "(bench/results/quantized_checkpoint-readahead-h200/load-profile-nf4-warm.txt). The "
        "patch looks the target up first and copies the converter only when it is new; what "
        "setdefault keeps is the same first copy as before."
    ),
    references=(
        "bench/results/quantized_checkpoint-readahead-h200/load-profile-nf4-warm.txt",
        "https://github.com/huggingface/transformers/blob/v5.23.0/src/transformers/core_model_loading.py",
    ),
    reproducer="validation/p20_converter_copies_per_key.py",
)
