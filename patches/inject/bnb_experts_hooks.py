"""Hooks that put MoE experts on bitsandbytes' 4-bit loading path in transformers.

P13 inserts this module, with experts_4bit.py, at the end of
transformers/integrations/bitsandbytes.py, and calls the hooks from the 4-bit quantizer:
- before weights load, `stackpatch_prepare_experts_4bit` turns each experts module's fused
  3D parameters into `bnb.nn.Params4bit` placeholders carrying the BitsAndBytesConfig (quant
  type, double quantization, quant storage) and selects the "bnb_4bit" experts
  implementation for it (modules in `llm_int8_skip_modules` are left alone);
- `stackpatch_experts_needs_quantization` makes `param_needs_quantization` say yes for those
  parameters, so transformers' own Bnb4bitQuantize quantizes each one as it is loaded and
  the BF16 tensor never stays on the GPU longer than one parameter;
- experts_4bit_checkpoint.py saves the packed experts with their quant state and loads
  them back;
- `bnb_4bit_experts_forward` is registered in transformers' ExpertsInterface; it runs the
  LoRA adapters that peft's ParamWrapper (patched by P15) hands over through
  `stackpatch_expert_lora` beside the packed weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from patches.inject.experts_4bit import (
    ExpertLoRA,
    PackedExperts,
    dequantize_4bit_by_blocks,
    experts_4bit_forward,
)

STACKPATCH_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
STACKPATCH_EXPERTS_IMPLEMENTATION = "bnb_4bit"
# {fused parameter name: LoRA adapters} of the forward in progress, set by P15's ParamWrapper.
STACKPATCH_EXPERT_LORA = "_stackpatch_expert_lora"


def stackpatch_is_experts_module(module: torch.nn.Module) -> bool:
    """A fused-experts module of the kind transformers' experts interface drives."""
    return type(module).__name__.endswith("Experts") and all(
        isinstance(getattr(module, name, None), torch.nn.Parameter)
        and getattr(module, name).dim() == 3
        for name in STACKPATCH_EXPERT_PARAMS
    )


def stackpatch_experts_needs_quantization(model: torch.nn.Module, param_name: str) -> bool:
    module_name, _, name = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, "_stackpatch_4bit_experts", False) and name in STACKPATCH_EXPERT_PARAMS


def stackpatch_prepare_experts_4bit(
    model: torch.nn.Module, modules_to_not_convert: list[str] | None, quantization_config
) -> int:
    """Swap fused expert parameters for 4-bit placeholders; return how many modules changed."""
    import bitsandbytes as bnb
    from transformers.quantizers.quantizers_utils import should_convert_module

    changed = 0
    for module_name, module in model.named_modules():
        if not stackpatch_is_experts_module(module):
            continue
        if not should_convert_module(module_name, modules_to_not_convert or []):
            continue
        for name in STACKPATCH_EXPERT_PARAMS:
            old = getattr(module, name)
            placeholder = bnb.nn.Params4bit(
                old.data,
                requires_grad=False,
                compress_statistics=quantization_config.bnb_4bit_use_double_quant,
                quant_type=quantization_config.bnb_4bit_quant_type,
                quant_storage=quantization_config.bnb_4bit_quant_storage,
            )
            setattr(module, name, placeholder)
        module._stackpatch_4bit_experts = True
        config = getattr(module, "config", None)
        if config is not None:
            previous = getattr(config, "_experts_implementation", None)
            if previous != STACKPATCH_EXPERTS_IMPLEMENTATION:
                config._stackpatch_previous_experts_implementation = previous
            config._experts_implementation = STACKPATCH_EXPERTS_IMPLEMENTATION
        changed += 1
    return changed


def stackpatch_dequantize_experts(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """`model.dequantize()` for packed experts: plain frozen Parameters again, in `dtype`."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "_stackpatch_4bit_experts", False):
            continue
        for name in STACKPATCH_EXPERT_PARAMS:
            packed = getattr(module, name)
            weight = dequantize_4bit_by_blocks(packed.data, packed.quant_state)
            weight = weight.to(dtype) if dtype is not None else weight
            setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))
        module._stackpatch_4bit_experts = False
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_stackpatch_previous_experts_implementation"):
            config._experts_implementation = config._stackpatch_previous_experts_implementation
        changed += 1
    return changed


@contextlib.contextmanager
def stackpatch_expert_lora(
    experts: torch.nn.Module, parameter_name: str, adapters: Sequence[ExpertLoRA]
) -> Iterator[None]:
    """Inside the block, the packed experts' forward adds these adapters' low-rank path to
    the fused weight `parameter_name`. Nested ParamWrappers (one per targeted weight) each
    open their own block around the same experts module."""
    active = experts.__dict__.setdefault(STACKPATCH_EXPERT_LORA, {})
    active[parameter_name] = tuple(adapters)
    try:
        yield
    finally:
        del active[parameter_name]


def bnb_4bit_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts interface entry: 4-bit weights run packed, anything else runs grouped_mm."""
    gate_up, down = self.gate_up_proj, self.down_proj
    if not (getattr(gate_up, "bnb_quantized", False) and getattr(down, "bnb_quantized", False)):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    lora = self.__dict__.get(STACKPATCH_EXPERT_LORA, {})
    return experts_4bit_forward(
        PackedExperts(gate_up.data, gate_up.quant_state),
        PackedExperts(down.data, down.quant_state),
        self._apply_gate,
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up_lora=lora.get("gate_up_proj", ()),
        down_lora=lora.get("down_proj", ()),
    )


def stackpatch_register_experts_4bit() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(STACKPATCH_EXPERTS_IMPLEMENTATION, bnb_4bit_experts_forward)
