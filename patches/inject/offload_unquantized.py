"""Keep what a resolved device map offloads out of bitsandbytes quantization.

P16 inserts this module at the end of transformers/modeling_utils.py and calls
`stackpatch_keep_offloaded_modules_unquantized` in `from_pretrained` right after the device
map is resolved. `llm_int8_enable_fp32_cpu_offload=True` promises that modules placed on
"cpu" or "disk" stay unquantized, but transformers' bitsandbytes quantizers collect them
before `device_map="auto"` (or "balanced", "sequential") is resolved, when there are none yet.
The model is still on the meta device at that point, so swapping a placeholder back costs
nothing: the weights then load in the model's dtype, as they do for a dict device map.
"""

from __future__ import annotations

import torch

STACKPATCH_OFFLOAD_DEVICES = ("cpu", "disk")


def stackpatch_offloaded_prefixes(device_map: object) -> list[str]:
    """The device-map entries that accelerate will offload."""
    if not isinstance(device_map, dict):
        return []
    return [name for name, device in device_map.items() if device in STACKPATCH_OFFLOAD_DEVICES]


def stackpatch_is_under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def stackpatch_unquantized_linear(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    """A float nn.Linear on the meta device with the shape of a bitsandbytes Linear."""
    return torch.nn.Linear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device="meta",
        dtype=dtype,
    )


def stackpatch_unpack_experts(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo stackpatch P13's 4-bit placeholders on one experts module (before loading)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if type(param).__name__ == "Params4bit":
            plain = torch.empty(param.shape, device="meta", dtype=dtype)
            setattr(module, name, torch.nn.Parameter(plain, requires_grad=False))
    module._stackpatch_4bit_experts = False


def stackpatch_keep_offloaded_modules_unquantized(
    model: torch.nn.Module, device_map: object, hf_quantizer: object, dtype: object
) -> int:
    """Swap bitsandbytes placeholders under offloaded device-map entries back to float ones;
    return how many modules changed."""
    config = getattr(hf_quantizer, "quantization_config", None)
    if not getattr(config, "llm_int8_enable_fp32_cpu_offload", False):
        return 0
    offloaded = stackpatch_offloaded_prefixes(device_map)
    if not offloaded:
        return 0
    import bitsandbytes as bnb

    dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
    changed = 0
    for name, module in list(model.named_modules()):
        if not stackpatch_is_under(name, offloaded):
            continue
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, stackpatch_unquantized_linear(module, dtype))
            changed += 1
        elif getattr(module, "_stackpatch_4bit_experts", False):
            stackpatch_unpack_experts(module, dtype)
            changed += 1
    not_converted = getattr(hf_quantizer, "modules_to_not_convert", None)
    if isinstance(not_converted, list):
        not_converted.extend(p for p in offloaded if p not in not_converted)
    return changed
