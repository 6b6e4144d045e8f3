"""Save and reload P13's packed 4-bit experts in bitsandbytes' own checkpoint layout.

A bitsandbytes Linear4bit saves its packed `weight` plus the entries of
`QuantState.as_dict(packed=True)`: `weight.absmax`, `weight.quant_map`, with double
quantization `weight.nested_absmax` and `weight.nested_quant_map`, and
`weight.quant_state.bitsandbytes__nf4` (or `__fp4`: quant type, blocksize, dtype, shape
and nested offset as JSON in a uint8 tensor). P13's experts module is a plain module that
holds `bnb.nn.Params4bit` parameters, which torch saves without their quant state, and
transformers' 4-bit loader only gathers those entries for parameters named `weight`.
So, for each fused expert parameter (`gate_up_proj`, `down_proj`):

- saving: a state-dict hook on the experts module writes the same entries beside the
  packed parameter (`...experts.gate_up_proj.absmax`, ...). `config.json` carries the
  quantization config as for any 4-bit model. unsloth-zoo's loader for pre-quantized
  fused experts (its `moe_utils_bnb4bit.py`) reads the same key names;
- loading a pre-quantized checkpoint: a WeightConverter per fused parameter gathers the
  packed bytes and the entries, and `Params4bit.from_prequantized` rebuilds the parameter
  on the device the bytes were read to: no float copy of an expert is made. A checkpoint
  whose experts are float (saved by stock transformers, which leaves them BF16) is
  quantized on the way in instead, as a BF16 checkpoint is;
- before any weight is read, the safetensors headers and the small quant-state entries of
  every packed expert are checked, so a truncated or damaged shard fails with one line
  that names the file and the key rather than loading garbage or random weights;
- after loading, the 4-bit deserialization converters are dropped from the model's record
  of conversions: they describe the checkpoint's own layout, which saving writes again,
  and transformers cannot reverse them (stock `save_pretrained` of any reloaded 4-bit
  model raises NotImplementedError from `Bnb4bitDeserialize.reverse_op`);
- a model with packed experts saves `llm_int8_skip_modules` as the list of modules it
  really kept unquantized, headed by STACKPATCH_CHECKPOINT_GUARD. Stock transformers
  reads that list as regular expressions before it loads any weight and stops on the
  guard with `re.error: bad character in group name 'stackpatch P13: ...'`; without it,
  stock transformers 5.5-5.22 would load the packed bytes into the float expert
  parameters (a "got Byte" error at the first forward) and 5.23 would refuse with a size
  mismatch that does not say why. P13 removes the guard before transformers reads the
  list. Any other loader that runs transformers' bitsandbytes quantizer stops on it too.

P13 inserts this module, after bnb_experts_hooks.py, into
transformers/integrations/bitsandbytes.py and calls it from the 4-bit quantizer.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps

from patches.inject.bnb_experts_hooks import STACKPATCH_EXPERT_PARAMS

# The entries bitsandbytes saves beside a packed 4-bit tensor (QuantState.as_dict(packed=True)).
STACKPATCH_QUANT_STATE_ENTRIES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)
_PACKED_STATE_PREFIX = "quant_state.bitsandbytes__"
# The JSON entries a packed quant state must hold to describe a tensor.
_STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes quantizes with


# An entry of a saved llm_int8_skip_modules: a regular expression that cannot compile, whose
# error message is this text. Stock transformers compiles every entry before loading weights.
STACKPATCH_CHECKPOINT_GUARD = (
    "(?P<stackpatch P13: this checkpoint holds MoE experts packed in 4 bits; transformers "
    "loads them only when patched by stackpatch P13 (python3 apply_patches.py --apply)>)"
)


class StackpatchCheckpointError(ValueError):
    """A pre-quantized checkpoint's packed experts are incomplete or inconsistent."""


def _fail(where: str, problem: str) -> StackpatchCheckpointError:
    return StackpatchCheckpointError(f"stackpatch P13: {where}: {problem}")


def stackpatch_save_quant_states(
    module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    """State-dict hook of an experts module: bitsandbytes' quant-state entries beside each
    packed fused parameter, named as Linear4bit names them beside its `weight`."""
    for name in STACKPATCH_EXPERT_PARAMS:
        param = module._parameters.get(name)
        state = getattr(param, "quant_state", None)
        if state is None or not getattr(param, "bnb_quantized", False):
            continue
        for key, value in state.as_dict(packed=True).items():
            state_dict[f"{prefix}{name}.{key}"] = value.detach()


def _prepared_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The experts modules P13 put on the 4-bit path (packed, or placeholders to fill)."""
    return [m for m in model.modules() if getattr(m, "_stackpatch_4bit_experts", False)]


def stackpatch_prepare_experts_checkpoint(
    model: torch.nn.Module, quantizer, checkpoint_files: Sequence[str] | None = None
) -> None:
    """After P13 swapped in its placeholders: make the packed experts save with their quant
    state and, for a pre-quantized checkpoint, check it and size the placeholders for it."""
    prepared = _prepared_experts(model)
    for module in prepared:
        if not getattr(module, "_stackpatch_saves_quant_state", False):
            module.register_state_dict_post_hook(stackpatch_save_quant_states)
            module._stackpatch_saves_quant_state = True
    if not quantizer.pre_quantized:
        return
    storage = quantizer.quantization_config.bnb_4bit_quant_storage
    if storage.is_floating_point:
        # Transformers before 5.23 casts a floating checkpoint tensor to its placeholder's
        # dtype; float-stored packed bytes must come in as they were written.
        for module in prepared:
            for name in STACKPATCH_EXPERT_PARAMS:
                placeholder = getattr(module, name)
                placeholder.data = placeholder.data.to(storage)
    expected = {
        name: {tuple(getattr(m, name).shape) for m in prepared} for name in STACKPATCH_EXPERT_PARAMS
    }
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            stackpatch_check_packed_experts(Path(path), expected)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator:
    """`path` opened by safetensors, which checks on opening that the file is complete."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError
        raise _fail(
            str(path),
            f"not a complete safetensors file ({error}); the download or save was cut "
            "short: fetch or save the checkpoint again",
        ) from None
    with handle:
        yield handle


def _packed_groups(keys: Iterable[str]) -> dict[str, set[str]]:
    """{packed parameter key: the quant-state entries present for it}, for every key that
    is a fused expert parameter's quant-state entry."""
    groups: dict[str, set[str]] = {}
    for key in keys:
        for entry in STACKPATCH_QUANT_STATE_ENTRIES:
            base = key.removesuffix("." + entry)
            if base != key and base.rpartition(".")[2] in STACKPATCH_EXPERT_PARAMS:
                groups.setdefault(base, set()).add(entry)
    return groups


def stackpatch_check_packed_experts(
    path: Path, expected_shapes: dict[str, set[tuple[int, ...]]]
) -> int:
    """Check every packed expert of one safetensors file before any weight is read: all
    entries present, the quant state readable, and its shape, blocksize and byte counts
    consistent with each other and with the model. Returns how many it checked."""
    with _opened(path) as handle:
        keys = set(handle.keys())
        groups = _packed_groups(keys)
        for base, entries in sorted(groups.items()):
            _check_group(handle, keys, f"{path}: {base}", base, entries, expected_shapes)
    return len(groups)


def _check_group(
    handle,
    keys: set[str],
    where: str,
    base: str,
    entries: set[str],
    expected_shapes: dict[str, set[tuple[int, ...]]],
) -> None:
    if base not in keys:
        raise _fail(where, "the quant state is there but the packed tensor is not")
    states = sorted(e for e in entries if e.startswith(_PACKED_STATE_PREFIX))
    if len(states) != 1:
        raise _fail(where, f"expected one {_PACKED_STATE_PREFIX}nf4/fp4 entry, found {states}")
    state = _unpack_state(where, handle.get_tensor(f"{base}.{states[0]}"))
    if state["quant_type"] != states[0].removeprefix(_PACKED_STATE_PREFIX):
        raise _fail(where, f"quant type {state['quant_type']!r} under the {states[0]} key")
    shapes = {e: tuple(handle.get_slice(f"{base}.{e}").get_shape()) for e in entries}
    packed = handle.get_slice(base)
    packed_bytes = math.prod(packed.get_shape()) * _dtype_size(where, packed.get_dtype())
    _check_consistent(where, state, packed_bytes, shapes)
    wanted = expected_shapes.get(base.rpartition(".")[2], set())
    if tuple(state["shape"]) not in wanted:
        raise _fail(
            where,
            f"holds experts of shape {tuple(state['shape'])} but the model's are "
            f"{' or '.join(str(s) for s in sorted(wanted)) or 'not packed'} "
            "(another model's checkpoint, or llm_int8_skip_modules keeps these experts "
            "unquantized)",
        )


_SAFETENSORS_SIZES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _dtype_size(where: str, dtype: str) -> int:
    if dtype not in _SAFETENSORS_SIZES:
        raise _fail(where, f"packed experts stored as {dtype}, which bitsandbytes cannot hold")
    return _SAFETENSORS_SIZES[dtype]


def _unpack_state(where: str, tensor: torch.Tensor) -> dict:
    try:
        state = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(where, f"its packed quant state is not readable JSON ({error})") from None
    missing = [f for f in _STATE_FIELDS if f not in state]
    if not isinstance(state, dict) or missing:
        raise _fail(where, f"its packed quant state lacks {missing}")
    return state


def _check_consistent(
    where: str, state: dict, packed_bytes: int, shapes: dict[str, tuple[int, ...]]
) -> None:
    """The quant state's own description against the sizes of the tensors beside it."""
    values = math.prod(state["shape"])
    blocksize = state["blocksize"]
    if state["quant_type"] not in ("nf4", "fp4") or blocksize not in _BLOCKSIZES:
        raise _fail(where, f"unknown quant type or blocksize ({state['quant_type']}, {blocksize})")
    if packed_bytes * 2 != values:
        shape = tuple(state["shape"])
        raise _fail(where, f"{packed_bytes} packed bytes cannot hold {values} 4-bit values {shape}")
    nested = "nested_absmax" in shapes
    complete = all(f in state for f in _NESTED_FIELDS) and "nested_quant_map" in shapes
    if nested != complete:
        raise _fail(where, "double quantization entries are incomplete")
    for entry in ("absmax", "quant_map"):
        if entry not in shapes:
            raise _fail(where, f"the {entry} entry is missing")
    blocks = math.prod(shapes["absmax"])
    if blocks != -(-values // blocksize):
        raise _fail(where, f"{blocks} block scales for {values} values of blocksize {blocksize}")


class StackpatchExperts4bitDeserialize(ConversionOps):
    """Builds one packed fused expert parameter from the checkpoint entries its converter
    gathered (keyed by the converter's source patterns)."""

    def __init__(self, hf_quantizer, entries: dict[str, str]) -> None:
        self.hf_quantizer = hf_quantizer
        self.entries = entries  # {source pattern: quant-state entry, "" for the tensor itself}

    def convert(
        self,
        input_dict: dict,
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs,
    ) -> dict:
        import bitsandbytes as bnb
        from transformers.quantizers.quantizers_utils import get_module_from_name

        tensors = {
            self.entries[k]: v[0] if isinstance(v, list) else v for k, v in input_dict.items()
        }
        weight = tensors.pop("", None)
        if weight is None:
            raise _fail(full_layer_name, "the quant state is there but the packed tensor is not")
        module, _ = get_module_from_name(model, full_layer_name)
        prepared = getattr(module, "_stackpatch_4bit_experts", False)
        if not tensors:  # float experts (a checkpoint stock transformers wrote)
            if prepared and weight.is_floating_point():
                return self._quantize(weight, model, full_layer_name)
            return {full_layer_name: weight}
        if not prepared:
            raise _fail(
                full_layer_name,
                "the checkpoint holds these experts packed in 4 bits but the model keeps them "
                "unquantized (llm_int8_skip_modules, or a device_map that offloads them to cpu "
                "or disk): load them onto the GPU without skipping them",
            )
        expected = tuple(model.get_parameter(full_layer_name).shape)
        param = bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=tensors, requires_grad=False, device=weight.device
        )
        found = tuple(param.quant_state.shape)
        if found != expected:
            problem = f"holds experts of shape {found}, the model's are {expected}"
            raise _fail(full_layer_name, problem)
        module._is_hf_initialized = True
        return {full_layer_name: param}

    def _quantize(self, weight: torch.Tensor, model: torch.nn.Module, name: str) -> dict:
        """Quantize float experts read from a pre-quantized checkpoint, as P13 does on its
        BF16 loading path (transformers' own Bnb4bitQuantize)."""
        from transformers.integrations.bitsandbytes import Bnb4bitQuantize

        quantized = Bnb4bitQuantize(self.hf_quantizer).convert(
            {name: [weight]}, full_layer_name=name, model=model
        )
        return {name: quantized[name]}


def stackpatch_experts_weight_conversions(quantizer, conversions: list) -> list:
    """The 4-bit quantizer's weight conversions, plus, for a pre-quantized checkpoint, one
    converter per fused expert parameter that gathers its packed tensor and quant state."""
    if not quantizer.pre_quantized:
        return conversions
    from transformers.core_model_loading import WeightConverter

    added = []
    for name in STACKPATCH_EXPERT_PARAMS:
        # Anchored: `down_proj` must not catch a dense MLP's `down_proj.weight`, nor an
        # entry of `shared_experts.down_proj`; longer entries first, as bitsandbytes' own.
        base = rf"\bexperts\.{name}"
        entries = {rf"{base}\.{re.escape(e)}$": e for e in STACKPATCH_QUANT_STATE_ENTRIES}
        entries[rf"{base}$"] = ""
        added.append(
            WeightConverter(
                source_patterns=list(entries),
                target_patterns=f"experts.{name}",
                operations=[StackpatchExperts4bitDeserialize(quantizer, entries)],
            )
        )
    return [*conversions, *added]


def stackpatch_forget_deserialize_conversions(model: torch.nn.Module) -> int:
    """Drop the 4-bit deserialization converters from the conversions transformers keeps
    for saving (they cannot be reversed, and saving writes the checkpoint's layout as it
    is); returns how many were dropped."""
    from transformers.integrations.bitsandbytes import Bnb4bitDeserialize

    kept = getattr(model, "_weight_conversions", None)
    if not kept:
        return 0
    deserialize = (Bnb4bitDeserialize, StackpatchExperts4bitDeserialize)
    remaining = [
        c
        for c in kept
        if not any(isinstance(op, deserialize) for op in getattr(c, "operations", ()))
    ]
    model._weight_conversions = remaining
    return len(kept) - len(remaining)


def stackpatch_strip_checkpoint_guard(quantization_config) -> bool:
    """Remove P13's guard from a loaded checkpoint's llm_int8_skip_modules (before transformers
    compiles the entries); True if it was there."""
    skipped = getattr(quantization_config, "llm_int8_skip_modules", None)
    if not skipped or STACKPATCH_CHECKPOINT_GUARD not in skipped:
        return False
    quantization_config.llm_int8_skip_modules = [
        s for s in skipped if s != STACKPATCH_CHECKPOINT_GUARD
    ]
    return True


def _has_packed_experts(model: torch.nn.Module) -> bool:
    return any(
        getattr(getattr(module, name, None), "bnb_quantized", False)
        for module in _prepared_experts(model)
        for name in STACKPATCH_EXPERT_PARAMS
    )


def stackpatch_finish_experts_loading(quantizer, model: torch.nn.Module) -> None:
    """After weights load: forget the irreversible deserialization converters and, when
    experts are packed, give the model a quantization config that saves with the guard
    and the exact list of modules left unquantized."""
    import copy

    stackpatch_forget_deserialize_conversions(model)
    if not _has_packed_experts(model):
        return
    guarded = copy.deepcopy(quantizer.quantization_config)
    kept = sorted(set(quantizer.modules_to_not_convert or ()))
    guarded.llm_int8_skip_modules = [STACKPATCH_CHECKPOINT_GUARD, *kept]
    quantizer.quantization_config = guarded
    model.config.quantization_config = guarded
