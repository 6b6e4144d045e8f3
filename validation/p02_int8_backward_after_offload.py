"""P2: LoRA backward through an 8-bit Gemma 4 layer that accelerate offloads (needs a GPU).

load_in_8bit with llm_int8_enable_fp32_cpu_offload and device_map="auto" on a GPU budget
smaller than the model, as a 24 GB card makes it for 26B-A4B: transformers quantizes the
layers the map sends to "cpu" as well (P16), accelerate offloads them, and its hook sets each
one's state.SCB to None right after forward. Exit 1 with bitsandbytes' failure in
MatMul8bitLt.backward on the unpatched stack; 0 on the patched one, where the loss and the
LoRA gradients of an offloaded layer equal those of the same adapters on the model loaded
whole onto the GPU (the same int8 weights).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, load_split, text_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

if not torch.cuda.is_available():
    raise SystemExit("inconclusive: needs a CUDA GPU (accelerate offloads to cpu only next to one)")

torch.manual_seed(0)
checkpoint = tempfile.mkdtemp()
config = text_config(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
Gemma4ForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


model, placed = load_split(checkpoint, quantization, ("cpu",), dtype=torch.float32)
model = get_peft_model(model, lora)
layer = next(k for k, v in placed.items() if v == "cpu")
q_proj = model.base_model.model.get_submodule(f"{layer}.self_attn.q_proj")
if type(q_proj.base_layer).__name__ != "Linear8bitLt":
    fine(f"{layer} is offloaded unquantized ({type(q_proj.base_layer).__name__}): no int8 path")

input_ids = torch.randint(0, 512, (2, 12), device="cuda:0")
try:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
except AttributeError as exc:
    bug(exc)


def reference_gradient(tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and LoRA gradient of the same adapters on the model loaded whole onto the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    reference = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map={"": 0}, quantization_config=quantization, dtype=torch.float32
    )
    reference = get_peft_model(reference, lora)
    adapters = {k: v.detach().to("cuda:0") for k, v in model.state_dict().items() if "lora_" in k}
    reference.load_state_dict(adapters, strict=False)
    expected = reference(input_ids=input_ids, labels=input_ids).loss
    expected.backward()
    torch.backends.cuda.matmul.allow_tf32 = False
    return expected, dict(reference.named_parameters())[name].grad.flatten().float()


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cosine, ((a - b).norm() / b.norm()).item()


name = f"base_model.model.{layer}.self_attn.q_proj.lora_A.default.weight"
grad = dict(model.named_parameters())[name].grad
if grad is None:
    raise SystemExit(f"inconclusive: {name} got no gradient")
grad = grad.to("cuda:0").flatten().float()
expected, expected_grad = reference_gradient(tf32=False)
# Baseline: the reference again with TF32 matmuls. Every int8 matmul re-quantizes its input
# rows, so a small change anywhere moves values by whole quantization steps downstream.
_, tf32_grad = reference_gradient(tf32=True)
cosine, relative = compare(grad, expected_grad)
baseline_cosine, baseline_relative = compare(tf32_grad, expected_grad)
measured = (
    f"loss {loss.item():.5f} vs {expected.item():.5f}; gradient cosine {cosine:.5f}, relative "
    f"difference {relative:.4f} (TF32 baseline: {baseline_cosine:.5f}, {baseline_relative:.4f})"
)
if abs(loss.item() - expected.item()) > 1e-3 or cosine < 0.99 or relative > 0.15:
    raise SystemExit(f"inconclusive: {name}: {measured}")
fine(f"LoRA trains through the offloaded int8 {layer}; against the unoffloaded model: {measured}")
