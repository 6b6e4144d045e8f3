"""P13 end to end on CPU: from_pretrained(load_in_4bit) of a tiny Gemma 4 on a patched transformers.

tests/test_torch_suite.py runs this with a P13-patched copy of the stack's transformers first
on PYTHONPATH.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
import transformers.integrations.bitsandbytes as bnb_integration
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import TEXT, text_config, train_steps
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

# Every Linear of the model; a user's skip list replaces transformers' default, so lm_head too.
NOT_EXPERTS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "router.proj",
    "lm_head",
]


def test_transformers_is_patched() -> None:
    assert hasattr(bnb_integration, "stackpatch_prepare_experts_4bit"), bnb_integration.__file__


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(text_config()).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        yield Path(directory), model


def load(path: Path, **config) -> torch.nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **config
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map="cpu", dtype=torch.bfloat16
    )


def experts_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]


def test_every_expert_tensor_is_packed(checkpoint) -> None:
    path, reference = checkpoint
    model = load(path, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    experts = experts_of(model)
    assert len(experts) == TEXT["num_hidden_layers"]
    for module in experts:
        assert module.config._experts_implementation == "bnb_4bit"
        for name in ("gate_up_proj", "down_proj"):
            tensor = getattr(module, name)
            assert type(tensor).__name__ == "Params4bit" and tensor.bnb_quantized
            assert tensor.dtype == torch.uint8
            assert tensor.quant_state.quant_type == "nf4" and tensor.quant_state.nested
            bf16_bytes = getattr(reference.model.layers[0].experts, name).numel() * 2
            assert tensor.numel() * tensor.element_size() == bf16_bytes // 4


def test_quant_type_and_double_quant_are_honoured(checkpoint) -> None:
    model = load(checkpoint[0], bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    state = experts_of(model)[0].gate_up_proj.quant_state
    assert state.quant_type == "fp4" and not state.nested


def test_skip_modules_stay_bf16_and_still_run(checkpoint) -> None:
    model = load(checkpoint[0], llm_int8_skip_modules=["model.layers.1.experts", "lm_head"])
    first, second = experts_of(model)
    assert first.gate_up_proj.bnb_quantized
    assert type(second.gate_up_proj).__name__ == "Parameter"
    assert second.gate_up_proj.dtype == torch.bfloat16
    logits = model(torch.randint(0, 512, (1, 8))).logits
    assert torch.isfinite(logits).all()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.float().flatten(), b.float().flatten(), dim=0
    ).item()


def test_logits_stay_close_to_bf16(checkpoint) -> None:
    path = checkpoint[0]
    # Loaded like the 4-bit model, so its float32 buffers (RoPE frequencies) match; the
    # in-memory model's .to(bfloat16) rounded them, which flips routing decisions.
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    experts_only = load(path, llm_int8_skip_modules=NOT_EXPERTS)
    assert "Linear4bit" not in {type(m).__name__ for m in experts_only.modules()}
    # The BF16 model with its experts replaced by the dequantized NF4 weights.
    rounded = copy.deepcopy(reference)
    for ours, theirs in zip(experts_of(experts_only), experts_of(rounded), strict=True):
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                packed = getattr(ours, name)
                getattr(theirs, name).copy_(dequantize_4bit(packed.data, packed.quant_state))
    with torch.no_grad():
        expected, logits = reference(ids).logits, experts_only(ids).logits
        same_weights = rounded(ids).logits
        everything = load(path)(ids).logits
    # Given the same 4-bit weights, the packed path computes what the BF16 path computes.
    assert cosine(logits, same_weights) > 0.999
    # NF4 rounding of random Gaussian experts, through two layers.
    assert cosine(logits, expected) > 0.85
    # Every Linear in NF4 as well: a tiny random model amplifies quantization error.
    assert cosine(everything, expected) > 0.6


def test_lora_training_steps_reduce_loss(checkpoint) -> None:
    model = load(checkpoint[0])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    losses = train_steps(model, steps=8, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_backward_reaches_the_input_through_the_experts(checkpoint) -> None:
    model = load(checkpoint[0])
    experts = experts_of(model)[0]
    hidden = torch.randn(10, TEXT["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    weights, index = torch.topk(torch.randn(10, TEXT["num_experts"]).softmax(-1), 2)
    experts(hidden, index, weights.to(torch.bfloat16)).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_dequantize_restores_bf16_experts_that_save_and_reload(checkpoint, tmp_path) -> None:
    model = load(checkpoint[0])
    # On a CPU with AVX512-BF16, an eval forward without gradients repacks every Linear4bit's
    # weight in place for bitsandbytes' fused kernel, and model.dequantize() then reads it as
    # the plain layout (tests/torch/test_cpu_branches.py): keep them on the generic branch.
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed_logits = model(ids).logits
    expected = {
        name: dequantize_4bit(getattr(module, name).data, getattr(module, name).quant_state)
        for module in experts_of(model)[:1]
        for name in ("gate_up_proj", "down_proj")
    }
    model.dequantize()
    for module in experts_of(model):
        assert not module._stackpatch_4bit_experts
        assert module.config._experts_implementation != "bnb_4bit"
        for name in ("gate_up_proj", "down_proj"):
            tensor = getattr(module, name)
            assert type(tensor) is torch.nn.Parameter and tensor.dtype == torch.bfloat16
            assert tensor.dim() == 3 and not tensor.requires_grad
    for name, weight in expected.items():
        assert torch.equal(getattr(experts_of(model)[0], name), weight.to(torch.bfloat16))
    with torch.no_grad():
        dequantized_logits = model(ids).logits
    assert cosine(dequantized_logits, packed_logits) > 0.99
    model.save_pretrained(tmp_path / "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert type(experts_of(reloaded)[0].gate_up_proj) is torch.nn.Parameter
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, dequantized_logits)


def test_lora_on_experts_works_when_they_are_left_in_bf16(checkpoint) -> None:
    # LoRA through peft's target_parameters needs float expert weights: keep the experts out
    # of 4-bit with llm_int8_skip_modules, the rest of the model stays NF4.
    model = load(checkpoint[0], llm_int8_skip_modules=["experts", "lm_head"])
    assert not any(getattr(m, "_stackpatch_4bit_experts", False) for m in experts_of(model))
    model = get_peft_model(
        model,
        LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    )
    batch = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
