"""P16's injected helper on real transformers quantizers: what a resolved device map offloads
goes back to float placeholders before loading; everything else stays quantized.

Runs inside the stack venvs (tests/test_torch_suite.py).
"""

from __future__ import annotations

import pytest
import torch
from tiny_gemma4 import text_config
from transformers import BitsAndBytesConfig, Gemma4ForCausalLM
from transformers.quantizers import AutoHfQuantizer

from patches.inject.bnb_experts_hooks import stackpatch_prepare_experts_4bit
from patches.inject.offload_unquantized import stackpatch_keep_offloaded_modules_unquantized

LAYER_MAP = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": 0,
}


def quantized_skeleton(config: BitsAndBytesConfig):
    """A tiny Gemma 4 on the meta device as preprocess_model leaves it for device_map="auto"."""
    with torch.device("meta"):
        model = Gemma4ForCausalLM(text_config())
    quantizer = AutoHfQuantizer.from_config(config)
    quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map="auto")
    return model, quantizer


def kind(model, layer: int) -> str:
    return type(model.get_submodule(f"model.layers.{layer}.self_attn.q_proj")).__name__


OFFLOAD_8BIT = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
OFFLOAD_4BIT = BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)


@pytest.mark.parametrize(
    ("config", "quantized"), [(OFFLOAD_8BIT, "Linear8bitLt"), (OFFLOAD_4BIT, "Linear4bit")]
)
def test_offloaded_layers_get_float_placeholders(config, quantized) -> None:
    model, quantizer = quantized_skeleton(config)
    assert kind(model, 0) == kind(model, 1) == quantized  # "auto" was not resolved yet

    changed = stackpatch_keep_offloaded_modules_unquantized(
        model, LAYER_MAP, quantizer, torch.bfloat16
    )

    assert (kind(model, 0), kind(model, 1)) == (quantized, "Linear")
    linear = model.get_submodule("model.layers.1.mlp.down_proj")
    assert type(linear) is torch.nn.Linear
    assert (linear.weight.device.type, linear.weight.dtype) == ("meta", torch.bfloat16)
    assert linear.weight.shape == (model.config.hidden_size, model.config.intermediate_size)
    offloaded = [m for n, m in model.named_modules() if n.startswith("model.layers.1.")]
    # P13-patched transformers (the torch suite's) also packs experts under load_in_4bit.
    unpacked = sum(getattr(m, "_stackpatch_4bit_experts", None) is False for m in offloaded)
    assert changed == sum(type(m).__name__ == "Linear" for m in offloaded) + unpacked
    # Loading asks the quantizer which parameters to quantize: not these any more.
    assert not quantizer.param_needs_quantization(model, "model.layers.1.self_attn.q_proj.weight")
    assert quantizer.param_needs_quantization(model, "model.layers.0.self_attn.q_proj.weight")
    assert "model.layers.1" in quantizer.modules_to_not_convert


def test_nothing_changes_without_the_offload_flag_or_a_resolved_map() -> None:
    model, quantizer = quantized_skeleton(BitsAndBytesConfig(load_in_8bit=True))
    assert stackpatch_keep_offloaded_modules_unquantized(model, LAYER_MAP, quantizer, None) == 0
    assert kind(model, 1) == "Linear8bitLt"
    model, quantizer = quantized_skeleton(OFFLOAD_8BIT)
    assert stackpatch_keep_offloaded_modules_unquantized(model, "auto", quantizer, None) == 0
    assert stackpatch_keep_offloaded_modules_unquantized(model, {"": 0}, quantizer, None) == 0
    assert kind(model, 1) == "Linear8bitLt"


def test_packed_experts_of_offloaded_layers_are_unpacked() -> None:
    model, quantizer = quantized_skeleton(OFFLOAD_4BIT)
    assert stackpatch_prepare_experts_4bit(model, [], OFFLOAD_4BIT) == 2

    stackpatch_keep_offloaded_modules_unquantized(model, LAYER_MAP, quantizer, torch.bfloat16)

    kept, unpacked = (model.get_submodule(f"model.layers.{i}.experts") for i in (0, 1))
    assert kept._stackpatch_4bit_experts is True
    assert type(kept.gate_up_proj).__name__ == "Params4bit"
    assert unpacked._stackpatch_4bit_experts is False
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(unpacked, name)
        assert type(param) is torch.nn.Parameter and param.dtype == torch.bfloat16
        assert param.shape == getattr(kept, name).shape
