"""LoRA `target_parameters` on MoE experts that P13 packed to 4 bits: P15's code in peft.

peft's ParamWrapper adapts a fused (E, out, in) expert weight by adding scaling * B_e @ A_e
to the float tensor through a torch parametrization. On P13's packed experts (uint8 bytes of
shape (N, 1) plus a quant state) that cannot work: the shape it reads is not the weight's,
and the parametrization fails at the first forward ("Registering a parametrization may not
change the dtype of the tensor"). It would also build the whole delta on every forward.

P15 inserts this module into peft/tuners/lora/layer.py and calls it from ParamWrapper where
it reads the parameter:
- `_get_in_out_features` and `update_layer`: the logical shape comes from the quant state and
  in/out are swapped as peft 0.19.1+ swaps them for a 3D weight, so the adapters are exactly
  the ones peft builds on BF16 experts (same parameters, names, shapes, init and scaling:
  a saved adapter loads either way); a parameter nothing can adapt is refused there;
- `__init__`: settings that cannot work on packed experts are refused, in one line, before
  any training;
- `_activate_lora`: instead of the parametrization, the active adapters' factors go to P13's
  experts forward, which runs one adapter per weight inside its fused 4-bit kernels where
  they run (a GPU with Triton), and otherwise as low-rank grouped GEMMs beside the 4-bit
  kernel;
- `merge`: the experts module is dequantized to BF16 first (exact, no re-quantization), then
  peft's own merge adds the delta: merge_and_unload returns BF16 experts.
"""

from __future__ import annotations

import contextlib

import torch

STACKPATCH_PACKED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def stackpatch_packed_experts(wrapper: torch.nn.Module) -> torch.nn.Module | None:
    """The experts module under this ParamWrapper if P13 packed it, else None."""
    base = wrapper.get_base_layer()
    return base if getattr(base, "_stackpatch_4bit_experts", False) else None


def _quant_shape(module: torch.nn.Module, parameter_name: str) -> torch.Size:
    return getattr(module, parameter_name).quant_state.shape


def _refusal(wrapper: torch.nn.Module, reason: str) -> ValueError:
    return ValueError(f"stackpatch P15: LoRA on {wrapper.parameter_name!r}: {reason}")


def stackpatch_in_out_features(wrapper: torch.nn.Module) -> tuple[int, int] | None:
    """peft's (in, out) reading of a packed expert stack's logical (E, ., .) shape; None for a
    float 2-D or 3-D parameter, which peft's own code reads. Refuses in one line what nothing
    can adapt: another 4-bit weight, or a tensor that is not 2-D or 3-D (stock peft fails on
    those later, with an IndexError or a dtype error from torch)."""
    base = wrapper.get_base_layer()
    weight = getattr(base, wrapper.parameter_name)
    if stackpatch_packed_experts(wrapper) is not None and (
        wrapper.parameter_name in STACKPATCH_PACKED_EXPERT_WEIGHTS
    ):
        num_experts, in_features, out_features = _quant_shape(base, wrapper.parameter_name)
        wrapper.num_experts = num_experts
        wrapper._param_ndim = 3  # what peft 0.21 reads in update_layer
        return in_features, out_features
    if getattr(weight, "quant_state", None) is not None:
        raise _refusal(
            wrapper,
            f"a 4-bit {type(base).__name__} weight is not a fused MoE expert stack; "
            "target_parameters adapts experts.gate_up_proj / experts.down_proj of 4-bit "
            "models (quantized Linear layers go in target_modules)",
        )
    dims = len(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 partitions keep ds_shape
    if dims not in (2, 3):
        raise _refusal(
            wrapper,
            f"{type(base).__name__}.{wrapper.parameter_name} is a {dims}-D tensor; LoRA adapts "
            "2-D weights and 3-D fused expert stacks",
        )
    return None


def stackpatch_swap_packed_in_out(wrapper: torch.nn.Module) -> None:
    """Swap in/out once, as peft 0.19.1+ does for a 3D weight without `is_transposed`: its own
    test reads the packed tensor's 2D shape on 0.19.1/0.20 and would not swap."""
    experts = stackpatch_packed_experts(wrapper)
    if experts is None or wrapper._did_swap_in_out_features:
        return
    if getattr(experts, "is_transposed", False):
        return
    wrapper.in_features, wrapper.out_features = wrapper.out_features, wrapper.in_features
    wrapper._did_swap_in_out_features = True


def stackpatch_check_packed_target(wrapper: torch.nn.Module, config, rank: int) -> None:
    """Refuse, in one line, LoRA settings that cannot work on P13's packed expert stacks."""
    base = wrapper.get_base_layer()
    if stackpatch_packed_experts(wrapper) is None:
        return
    from packaging.version import Version
    from peft import __version__ as peft_version

    if Version(peft_version) < Version("0.19.1"):
        raise _refusal(
            wrapper,
            f"peft {peft_version} lays out expert adapters unlike peft >= 0.19.1 (no in/out "
            "swap), so they would not load into other versions; upgrade peft to >= 0.19.1",
        )
    unsupported = {
        "lora_dropout": bool(config.lora_dropout),
        "use_dora": bool(config.use_dora),
        "fan_in_fan_out": bool(config.fan_in_fan_out),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
    }
    chosen = [name for name, on in unsupported.items() if on]
    if chosen:
        raise _refusal(
            wrapper,
            f"{', '.join(chosen)} cannot apply to expert weights (peft's ParamWrapper "
            "supports none of them); set lora_dropout=0, use_dora=False, "
            "fan_in_fan_out=False and lora_bias=False",
        )
    _, rows, cols = _quant_shape(base, wrapper.parameter_name)
    if not 0 < rank <= min(rows, cols):
        raise _refusal(
            wrapper,
            f"rank {rank} is outside 1..{min(rows, cols)}, the rank of one expert's "
            f"({rows} x {cols}) weight",
        )


def stackpatch_packed_experts_lora(
    wrapper: torch.nn.Module, active_adapters: list[str]
) -> contextlib.AbstractContextManager:
    """What `_activate_lora` does on packed experts: hand the active adapters' factors to
    P13's experts forward for the duration of the block, instead of a parametrization."""
    from transformers.integrations.bitsandbytes import ExpertLoRA, stackpatch_expert_lora

    adapters = [
        ExpertLoRA(wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.scaling[name])
        for name in active_adapters
        if name in wrapper.lora_A
    ]
    return stackpatch_expert_lora(wrapper.get_base_layer(), wrapper.parameter_name, adapters)


def stackpatch_unpack_before_merge(
    wrapper: torch.nn.Module, adapter_names: list[str] | None
) -> None:
    """Before peft merges into packed experts: dequantize the whole experts module (both fused
    weights, so it stays consistent) to its compute dtype; peft then adds the delta."""
    experts = stackpatch_packed_experts(wrapper)
    if experts is None:
        return
    names = wrapper.active_adapters if adapter_names is None else adapter_names
    if not any(n in wrapper.lora_A and n not in wrapper.merged_adapters for n in names):
        return
    from transformers.integrations.bitsandbytes import stackpatch_dequantize_experts

    stackpatch_dequantize_experts(experts)
