"""P11: `bnb.nn.Int8Params.__new__` accepts the keyword arguments transformers 5 passes."""

from __future__ import annotations

import libcst as cst

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

CLASS = "Int8Params"


def _last_param(params: cst.Parameters) -> cst.Param | None:
    ordered = [*params.posonly_params, *params.params]
    if isinstance(params.star_arg, cst.Param):
        ordered.append(params.star_arg)
    ordered.extend(params.kwonly_params)
    return ordered[-1] if ordered else None


def _replace_param(params: cst.Parameters, old: cst.Param, new: cst.Param) -> cst.Parameters:
    def swap(group: tuple[cst.Param, ...] | list[cst.Param]) -> list[cst.Param]:
        return [new if p is old else p for p in group]

    star_arg = new if params.star_arg is old else params.star_arg
    return params.with_changes(
        posonly_params=swap(params.posonly_params),
        params=swap(params.params),
        star_arg=star_arg,
        kwonly_params=swap(params.kwonly_params),
    )


class AcceptExtraKwargsInInt8ParamsNew(PatchTransform):
    DESCRIPTION = f"Give {CLASS}.__new__ a **kwargs parameter so unknown keywords are ignored."
    SCOPE = (CLASS, "__new__")

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        params = updated_node.params
        last = _last_param(params)
        if params.star_kwarg is not None or last is None:
            return updated_node
        self.count_rewrite()
        kwargs = cst.Param(name=cst.Name("kwargs"), star="**")
        layout = last.comma.whitespace_after if isinstance(last.comma, cst.Comma) else None
        if isinstance(layout, cst.ParenthesizedWhitespace):
            # One parameter per line with a trailing comma: add `**kwargs,` as its own marked line.
            between = updated_node.whitespace_before_params
            indent = (
                between.last_line
                if isinstance(between, cst.ParenthesizedWhitespace)
                else layout.last_line
            )
            kwargs = kwargs.with_changes(
                comma=cst.Comma(
                    whitespace_after=layout.with_changes(first_line=self.trailing_marker())
                )
            )
            previous = last.with_changes(
                comma=cst.Comma(
                    whitespace_after=cst.ParenthesizedWhitespace(indent=True, last_line=indent)
                )
            )
            params = _replace_param(params, last, previous)
            return updated_node.with_changes(params=params.with_changes(star_kwarg=kwargs))
        # Parameters on one line: the marker goes on the `def` line that changed.
        if not isinstance(last.comma, cst.Comma):
            last = last.with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
            params = _replace_param(params, _last_param(params), last)  # type: ignore[arg-type]
        body = updated_node.body
        if isinstance(body, cst.IndentedBlock):
            body = body.with_changes(header=self.trailing_marker(existing=body.header))
        return updated_node.with_changes(params=params.with_changes(star_kwarg=kwargs), body=body)

    def is_fixed_upstream(self, module: cst.Module) -> bool:
        news = self.scope_nodes(module)
        return any(cst.ensure_type(n, cst.FunctionDef).params.star_kwarg is not None for n in news)


PATCH = Patch(
    id="P11",
    slug="int8params-accepts-hf-kwargs",
    title="bitsandbytes Int8Params accepts transformers' extra keyword arguments",
    package="bitsandbytes",
    affected="<0.50.0",
    status=Status.UPSTREAMABLE,
    targets=(Target("bitsandbytes/nn/modules.py", AcceptExtraKwargsInInt8ParamsNew),),
    rationale=(
        "transformers 5 marks every parameter it loads with `_is_hf_initialized`. Code that "
        "later rebuilds an 8-bit weight from its attributes, as accelerate's "
        "set_module_tensor_to_device does (`Int8Params(value, requires_grad=..., "
        "**old_param.__dict__)`, called by the offload hooks of a device_map that offloads "
        "layers), passes that keyword on. Int8Params.__new__ in bitsandbytes before 0.50.0 "
        "takes a fixed set of keywords and raises TypeError, so INT8 training with CPU offload "
        "fails. bitsandbytes 0.50.0 added `**kwargs` to the signature; this patch adds the same "
        "to older releases."
    ),
    references=(
        "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1927",
        "consumer-llm-patches P11",
    ),
    reproducer="validation/p11_int8params_kwargs.py",
)
