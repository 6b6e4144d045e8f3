"""P15: LoRA target_parameters on P13's packed 4-bit experts, on CPU in a real stack venv.

tests/test_torch_suite.py runs this with P13-patched transformers and P15-patched peft first on
PYTHONPATH; the stack's own, unpatched transformers and peft stay installed underneath, and
the compatibility tests run them in a subprocess ("stock") without the patched copies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_gemma4 import TEXT, text_config, train_steps
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

from patches.inject.experts_4bit import (
    ExpertLoRA,
    expert_lora_delta,
    experts_4bit_forward,
    pack_experts,
    route,
)

EXPERT_WEIGHTS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONFIG = {"top_k_experts": 4}  # four experts per token: more routed rows for the adapters
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.float().flatten(), b.float().flatten(), dim=0
    ).item()


def test_peft_and_transformers_are_patched() -> None:
    import peft.tuners.lora.layer as layer
    import transformers.integrations.bitsandbytes as integration

    assert hasattr(integration, "stackpatch_expert_lora"), integration.__file__
    assert hasattr(layer, "stackpatch_check_packed_target"), layer.__file__


# --- the low-rank path alone --------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_is_peft_delta_weight_per_routed_row(rank: int, dtype: torch.dtype) -> None:
    """Each row routed to expert e gets x @ dW_e^T with dW from stock peft's get_delta_weight:
    A expert-major, B rank-major. Reading B expert-major (B[:, e*r:(e+1)*r]) fails this for
    rank > 1, which a shape check cannot see."""
    experts, out_features, in_features, tokens = 6, 32, 24, 40
    generator = torch.Generator().manual_seed(rank)
    lora_a = torch.randn(rank * experts, in_features, generator=generator)
    lora_b = torch.randn(out_features, rank * experts, generator=generator)
    # peft's ParamWrapper.get_delta_weight for a 3D weight stored (E, out, in):
    delta_weight = torch.einsum(
        "o r e, e r i -> e o i",
        lora_b.reshape(out_features, -1, experts),
        lora_a.reshape(experts, -1, in_features),
    )
    x = torch.randn(tokens, in_features, generator=generator)
    index = torch.randint(0, experts - 1, (tokens, 1), generator=generator)  # one expert idle
    perm, offsets = route(index, experts)
    rows = x[perm]
    adapter = ExpertLoRA(lora_a, lora_b, scaling=0.5)
    got = expert_lora_delta(rows.to(dtype), offsets, [adapter], experts)
    expected = torch.einsum("t i, t o i -> t o", rows, delta_weight[index.flatten()[perm]]) * 0.5
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), expected, rtol=tolerance, atol=tolerance * 10)
    if rank > 1:
        swapped = ExpertLoRA(
            lora_a, lora_b.view(out_features, rank, experts).transpose(1, 2).reshape_as(lora_b), 0.5
        )
        wrong = expert_lora_delta(rows.to(dtype), offsets, [swapped], experts)
        assert not torch.allclose(wrong.float(), expected, rtol=0.1, atol=1.0)


def test_gradients_reach_a_b_and_the_input() -> None:
    experts, rank, tokens = 4, 4, 20
    x = torch.randn(tokens, 16, dtype=torch.bfloat16, requires_grad=True)
    lora_a = torch.randn(rank * experts, 16, requires_grad=True)
    lora_b = torch.randn(32, rank * experts, requires_grad=True)
    index = torch.randint(0, experts, (tokens, 1))
    perm, offsets = route(index, experts)
    delta = expert_lora_delta(x[perm], offsets, [ExpertLoRA(lora_a, lora_b, 2.0)], experts)
    (delta.float() * torch.randn(delta.shape)).sum().backward()
    for tensor in (x, lora_a, lora_b):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert lora_a.grad.dtype == torch.float32 and lora_b.grad.dtype == torch.float32


def test_dense_and_grouped_first_projection_agree() -> None:
    """gate_up's A on the tokens (dense GEMM, gathered) or on the routed rows (grouped GEMM):
    the same output and the same gradients of the input, A and B, for an odd rank too."""
    experts, hidden, inner, tokens, top_k = 8, 64, 64, 24, 2
    generator = torch.Generator().manual_seed(9)
    gate_up = pack_experts(torch.randn(experts, 2 * inner, hidden, generator=generator))
    down = pack_experts(torch.randn(experts, hidden, inner, generator=generator))
    x = torch.randn(tokens, hidden, generator=generator)
    probs = torch.randn(tokens, experts, generator=generator).softmax(-1)
    weights, index = torch.topk(probs, top_k)
    grad = torch.randn(tokens, hidden, generator=generator)

    def gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        g, u = gate_up_out.chunk(2, dim=-1)
        return torch.nn.functional.gelu(g) * u

    results = {}
    for first in ("dense", "grouped"):
        factors = [
            torch.randn(3 * experts, hidden, generator=torch.Generator().manual_seed(1)),
            torch.randn(2 * inner, 3 * experts, generator=torch.Generator().manual_seed(2)),
        ]
        for factor in factors:
            factor.requires_grad_()
        inputs = x.clone().requires_grad_()
        out = experts_4bit_forward(
            gate_up,
            down,
            gate,
            inputs,
            index,
            weights,
            gate_up_lora=[ExpertLoRA(*factors, 0.5)],
            lora_first_projection=first,
        )
        out.backward(grad)
        results[first] = [out.detach(), inputs.grad, *(f.grad for f in factors)]
    for dense, grouped in zip(*results.values(), strict=True):
        assert ((dense - grouped).norm() / grouped.norm()).item() < 1e-5  # float32 sums


class _LargestFloat(TorchDispatchMode):
    """Records the largest floating-point tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_weight_sized_tensor_exists_forward_or_backward() -> None:
    """With one expert dequantized at a time (the CPU path; on a GPU the fused kernel
    dequantizes nothing), nothing the size of an (E, out, in) weight or delta appears."""
    experts, hidden, inner, tokens, top_k = 16, 128, 64, 64, 2
    generator = torch.Generator().manual_seed(5)
    gate_up = pack_experts(torch.randn(experts, 2 * inner, hidden, generator=generator).bfloat16())
    down = pack_experts(torch.randn(experts, hidden, inner, generator=generator).bfloat16())
    adapters = {
        name: ExpertLoRA(
            torch.randn(8 * experts, fan_in, generator=generator, requires_grad=True),
            torch.randn(fan_out, 8 * experts, generator=generator, requires_grad=True),
            1.0,
        )
        for name, fan_in, fan_out in (("gate_up", hidden, 2 * inner), ("down", inner, hidden))
    }
    x = torch.randn(tokens, hidden, generator=generator).bfloat16().requires_grad_()
    probs = torch.randn(tokens, experts, generator=generator).softmax(-1)
    weights, index = torch.topk(probs, top_k)

    def gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        g, u = gate_up_out.chunk(2, dim=-1)
        return torch.nn.functional.gelu(g) * u

    one_expert = hidden * 2 * inner * 2  # bytes of one BF16 expert: chunks of one
    with _LargestFloat() as seen:
        out = experts_4bit_forward(
            gate_up,
            down,
            gate,
            x,
            index,
            weights.bfloat16(),
            chunk_bytes=one_expert,
            gate_up_lora=[adapters["gate_up"]],
            down_lora=[adapters["down"]],
        )
        (out.float() * torch.randn(out.shape, generator=generator)).sum().backward()
    assert adapters["down"].lora_B.grad.abs().sum() > 0
    assert seen.largest < experts * hidden * inner  # far below one weight, let alone a delta
    assert seen.largest >= hidden * 2 * inner  # the one-expert chunk itself was seen


# --- whole tiny models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints():
    """(BF16 checkpoint, the same model in float32 with every 4-bit weight replaced by its NF4
    value, as the packed model computing in float32 decodes it)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        original, rounded = Path(directory) / "bf16", Path(directory) / "rounded"
        Gemma4ForCausalLM(text_config(**CONFIG)).to(torch.bfloat16).save_pretrained(original)
        model = load_packed(original, torch.float32)
        model.dequantize()
        model.save_pretrained(rounded)
        yield original, rounded


def load_packed(path: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map="cpu", dtype=dtype
    )


def experts_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]


def lora(**overrides) -> LoraConfig:
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ATTENTION,
        "target_parameters": EXPERT_WEIGHTS,
        **overrides,
    }
    return LoraConfig(**settings)


def logits(model: torch.nn.Module) -> torch.Tensor:
    # Train mode (Gemma 4 has no dropout): there a 4-bit Linear dequantizes and multiplies as
    # its BF16 counterpart does. In eval mode on CPUs with AVX512-BF16, bitsandbytes switches
    # to a repacked kernel with its own rounding (logits cosine 0.992 to the dequantized model
    # on this tiny one), which would blur what these tests compare.
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def stock_python_env() -> dict[str, str]:
    """The environment of this interpreter without the patched copies on PYTHONPATH."""
    overlay = Path(transformers.__file__).resolve().parents[1]
    assert Path(peft.__file__).resolve().parents[1] == overlay
    paths = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and Path(p).resolve() != overlay
    ]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


STOCK = r"""
import sys, torch
import peft.tuners.lora.layer as layer
import transformers.integrations.bitsandbytes as integration
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
assert not hasattr(integration, "stackpatch_prepare_experts_4bit"), integration.__file__
assert not hasattr(layer, "stackpatch_check_packed_target"), layer.__file__
mode, base, adapter, out = sys.argv[1:5]
ids = torch.load(out + ".ids")
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
if mode == "load":
    model = PeftModel.from_pretrained(model, adapter)
else:
    model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(6):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter)
model.train()  # as the packed side (see logits() there)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits.float(), out)
"""


def run_stock(mode: str, base: Path, adapter: Path, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / f"stock-{mode}.pt"
    torch.save(IDS, str(out) + ".ids")
    completed = subprocess.run(
        [sys.executable, "-c", STOCK, mode, str(base), str(adapter), str(out)],
        capture_output=True,
        text=True,
        env=stock_python_env(),
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out)


# The two compatibility tests compute in float32 on both sides (4-bit weights, float32
# compute): a layout error changes the logits, rounding does not. In BF16, stock peft rounds
# W + dW to BF16 (which loses most of a small dW's bits) where the packed path adds the
# low-rank product separately, and on this tiny random model that alone moves the logits'
# cosine to 0.986-0.997; tests above check the BF16 path against float32 references.
def test_adapter_trained_packed_means_the_same_in_stock_peft(checkpoints, tmp_path) -> None:
    """(a) Trained on the packed model, saved, loaded by stock peft onto the model whose
    weights are the NF4 values: the same logits."""
    original, rounded = checkpoints
    model = get_peft_model(load_packed(original, torch.float32), lora())
    losses = train_steps(model, steps=6, lr=1e-2, seed=3)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(getattr(m, "_stackpatch_4bit_experts", False) for m in experts_of(model))
    expert_b = [p for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(expert_b) == 4 and all(p.abs().sum() > 0 for p in expert_b)
    model.save_pretrained(tmp_path / "adapter")
    ours = logits(model)
    theirs = run_stock("load", rounded, tmp_path / "adapter", tmp_path)
    assert cosine(ours, theirs) >= 0.9999


def test_adapter_trained_by_stock_peft_loads_onto_the_packed_model(checkpoints, tmp_path) -> None:
    """(b) Trained by stock peft on float experts (the NF4 values), loaded onto packed ones."""
    original, rounded = checkpoints
    theirs = run_stock("train", rounded, tmp_path / "adapter", tmp_path)
    model = PeftModel.from_pretrained(load_packed(original, torch.float32), tmp_path / "adapter")
    assert all(getattr(m, "_stackpatch_4bit_experts", False) for m in experts_of(model))
    assert cosine(logits(model), theirs) >= 0.9999
    without = logits(load_packed(original, torch.float32))
    assert cosine(without, theirs) < 0.999  # the adapter does change the output


def test_saved_keys_and_shapes_are_peft_format(checkpoints, tmp_path) -> None:
    from safetensors.torch import load_file

    model = get_peft_model(load_packed(checkpoints[0]), lora(r=3, target_modules=[]))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    hidden, inner = TEXT["hidden_size"], TEXT["moe_intermediate_size"]
    experts = TEXT["num_experts"]
    prefix = "base_model.model.model.layers.0.experts"
    assert saved[f"{prefix}.base_layer.lora_A.weight"].shape == (3 * experts, hidden)
    assert saved[f"{prefix}.base_layer.lora_B.weight"].shape == (2 * inner, 3 * experts)
    assert saved[f"{prefix}.lora_A.weight"].shape == (3 * experts, inner)
    assert saved[f"{prefix}.lora_B.weight"].shape == (hidden, 3 * experts)
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_checkpointing_gives_the_same_gradients(checkpoints) -> None:
    def lora_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        base = load_packed(checkpoints[0])
        if checkpointing:
            base.gradient_checkpointing_enable({"use_reentrant": False})
            base.enable_input_require_grads()
        model = get_peft_model(base, lora(init_lora_weights=False))  # B random, not zero
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "experts" in n and "lora" in n}

    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for name, gradient in plain.items():
        assert gradient.abs().sum() > 0, name
        assert torch.allclose(gradient, checkpointed[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_gives_float_experts_with_the_deltas(checkpoints, dtype) -> None:
    model = get_peft_model(load_packed(checkpoints[0], dtype), lora(target_modules=[]))
    train_steps(model, steps=3, lr=1e-2, seed=3)
    before = logits(model)
    merged = model.merge_and_unload()
    for module in experts_of(merged):
        assert not module._stackpatch_4bit_experts
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(module, name)
            assert type(weight) is torch.nn.Parameter and weight.dtype == dtype
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    # Merged in BF16, W + dW is rounded to BF16 (see the compatibility tests' note).
    assert cosine(logits(merged), before) >= (0.9999 if dtype == torch.float32 else 0.99)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"use_dora": True}, "use_dora"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"r": 65}, "rank 65 is outside 1..64"),
        ({"target_parameters": ["input_layernorm.weight"]}, "a 1-D tensor"),
    ],
)
def test_bad_settings_are_refused_in_one_line(checkpoints, settings, words) -> None:
    model = load_packed(checkpoints[0])
    with pytest.raises(ValueError) as raised:
        get_peft_model(model, lora(target_modules=[], **settings))
    message = str(raised.value)
    assert words in message and "\n" not in message, message
