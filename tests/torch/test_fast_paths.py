"""examples/fast_paths.py on CPU: what each fast path swaps computes what it replaces.

Runs inside the stack venvs (tests/test_torch_suite.py). liger-kernel's Triton kernels need a
GPU (Triton's CPU interpreter does not run them: scalar arguments arrive as Python floats,
"'float' object has no attribute 'to'"), so here only what `use_liger_kernels` swaps and
restores is checked; bench/train_step.py compares its numbers on the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import fast_paths
from fast_paths import (
    chunked_causal_attention,
    compile_decoder_layers,
    use_liger_kernels,
    use_wide_head_attention,
)

TOKENS = 24  # longer than the tiny sliding window (16): sliding layers get a mask


def tiny_lora_model(**overrides):
    """The tiny 26B-A4B-shaped text model in float32, LoRA on attention, checkpointed: the
    example's training set-up without 4-bit (bitsandbytes stays out of compiled graphs)."""
    from peft import LoraConfig, get_peft_model
    from tiny_gemma4 import text_config
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(text_config(attn_implementation="sdpa", **overrides))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero, so gradients reach lora_A too
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train()


def step(model) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, logits, LoRA gradients) of one forward + backward on fixed tokens."""
    ids = torch.randint(5, 500, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_same_step(ours, reference, rtol: float, atol: float) -> None:
    (loss, logits, grads), (loss_ref, logits_ref, grads_ref) = ours, reference
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(logits, logits_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() and len(grads) == 16  # A and B of 8 modules
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_causal_attention_matches_sdpa(chunk: int) -> None:
    """GQA (4 query heads on 2 key/value heads) without copying keys, any chunking."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, h, 19, 32, generator=generator, requires_grad=True) for h in (4, 2, 2)
    )
    ours = chunked_causal_attention(q, k, v, scale=0.3, chunk=chunk)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn(ours.shape, generator=generator)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["chunked", "math"])
def test_wide_head_attention_keeps_the_step(kernel: str, monkeypatch) -> None:
    """The global layer (head_dim 32 in the tiny model) runs `kernel`; the step is unchanged,
    and undo gives the SDPA path back."""
    model = tiny_lora_model()
    reference = step(model)
    calls = []
    original = fast_paths.chunked_causal_attention
    monkeypatch.setattr(
        fast_paths,
        "chunked_causal_attention",
        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k),
    )
    undo = use_wide_head_attention(model, kernel, head_dim=32)
    assert undo.count >= 1
    assert_same_step(step(model), reference, rtol=1e-5, atol=1e-6)
    # forward and the checkpointed recompute, in the one global layer only
    assert calls == ([torch.Size([1, 4, TOKENS, 32])] * 2 if kernel == "chunked" else [])
    undo()
    assert {c._attn_implementation for c in fast_paths._configs_of(model)} == {"sdpa"}
    assert_same_step(step(model), reference, rtol=0, atol=0)


def test_compiled_decoder_layers_keep_the_step() -> None:
    """Regional compile under non-reentrant checkpointing with LoRA: same loss, logits and
    LoRA gradients as eager; undo gives the eager layers back. Dynamo, AOTAutograd's
    partition and checkpointing's recompute are what can break here (two layer kinds, one
    compiled code); "aot_eager" runs exactly those without Inductor's C++ code generation,
    which takes minutes on 2 CPU cores (the GPU benchmark compiles with Inductor)."""
    model = tiny_lora_model()
    reference = step(model)
    undo = compile_decoder_layers(model, backend="aot_eager")
    assert (undo.count, undo.excluded) == (2, 2)  # the layers; the experts stay eager
    assert_same_step(step(model), reference, rtol=1e-4, atol=1e-5)
    assert_same_step(step(model), reference, rtol=1e-4, atol=1e-5)  # the cached graphs too
    undo()
    assert all(layer._compiled_call_impl is None for layer in model.base_model.model.model.layers)
    assert_same_step(step(model), reference, rtol=0, atol=0)


def attributes(model) -> dict[str, set[str]]:
    """Per module: its instance attributes and own buffers."""
    return {
        name: set(vars(module)) | set(dict(module.named_buffers(recurse=False)))
        for name, module in model.named_modules()
    }


def test_liger_swaps_every_norm_and_mlp_of_the_language_model_and_undoes() -> None:
    """Every Gemma4RMSNorm of the text model (11 per MoE layer: the router's and v_norm
    too, with a unit scale of the right width) and every dense MLP; nothing in the vision
    tower; undo leaves no trace."""
    from tiny_gemma4 import multimodal_config
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration(multimodal_config())
    before = {
        n: set(vars(m)) | set(dict(m.named_buffers(recurse=False)))
        for n, m in model.named_modules()
    }
    undo = use_liger_kernels(model)
    swapped = {n for n, m in model.named_modules() if "forward" in vars(m)}
    norms = {n for n in swapped if n.endswith("norm") or "layernorm" in n}
    assert len(norms) == 2 * 11 + 1 and undo.count == len(norms) + 2
    assert {n for n in swapped if n.endswith(".mlp")} == {
        f"model.language_model.layers.{i}.mlp" for i in (0, 1)
    }
    assert not [n for n in swapped if "vision" in n]
    widths = {
        n: m._stackpatch_unit_scale.numel()
        for n, m in model.named_modules()
        if hasattr(m, "_stackpatch_unit_scale")
    }
    layers = "model.language_model.layers"
    assert widths == {
        f"{layers}.0.self_attn.v_norm": 16,  # sliding layer: head_dim
        f"{layers}.1.self_attn.v_norm": 32,  # full-attention layer: global_head_dim
        f"{layers}.0.router.norm": 64,
        f"{layers}.1.router.norm": 64,
    }
    undo()
    after = {
        n: set(vars(m)) | set(dict(m.named_buffers(recurse=False)))
        for n, m in model.named_modules()
    }
    assert after == before
