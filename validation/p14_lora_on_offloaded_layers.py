"""P14: LoRA on a Gemma 4 layer that accelerate offloads, as a small-GPU device_map makes it.

Layer 1 goes to "disk" (on a GPU machine, "cpu" next to cuda:0 takes the same path: the
weights wait on the meta device and accelerate loads them for each forward). Exit 1 with
PEFT's failure on the unpatched stack (NaN loss, then "expected device meta" in backward);
0 on the patched one, where the offloaded layer's adapters train and the loss and gradients
equal those of the same adapters on the model without offload.
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, text_config
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM

torch.manual_seed(0)
checkpoint, offload = tempfile.mkdtemp(), tempfile.mkdtemp()
Gemma4ForCausalLM(text_config()).save_pretrained(checkpoint)
device = "cuda:0" if torch.cuda.is_available() else "cpu"
offloaded = "cpu" if device != "cpu" else "disk"
device_map = {
    "model.embed_tokens": device,
    "model.rotary_emb": device,
    "model.layers.0": device,
    "model.layers.1": offloaded,
    "model.norm": device,
    "lm_head": device,
}
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
model = AutoModelForCausalLM.from_pretrained(
    checkpoint, device_map=device_map, offload_folder=offload, dtype=torch.float32
)
model = get_peft_model(model, lora)
input_ids = torch.randint(0, 512, (2, 12), device=device)
try:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
except RuntimeError as exc:
    bug(exc)

# The same adapters on the model without offload: what the offloaded run must compute.
reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
reference = get_peft_model(reference, lora)
adapters = {k: v.detach().to(device) for k, v in model.state_dict().items() if "lora_" in k}
reference.load_state_dict(adapters, strict=False)
expected = reference(input_ids=input_ids, labels=input_ids).loss
expected.backward()
offloaded_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
grads = dict(model.named_parameters())[offloaded_a].grad
expected_grads = dict(reference.named_parameters())[offloaded_a].grad
if not torch.isfinite(loss):
    raise SystemExit(f"inconclusive: loss {loss.item()} without an error")
if grads is None or not torch.allclose(loss, expected, atol=1e-4):
    raise SystemExit(f"inconclusive: loss {loss.item():.5f} vs {expected.item():.5f} unoffloaded")
if not torch.allclose(grads.to(device), expected_grads, atol=1e-4):
    raise SystemExit("inconclusive: the offloaded layer's LoRA gradient differs from the reference")
fine(f"LoRA on the layer offloaded to {offloaded} trains; loss {loss.item():.4f} matches")
