"""P12: LoRA on q/k/v/o of a Gemma 4 with its vision tower, as most fine-tuning recipes write it.

The vision tower's projections are Gemma4ClippableLinear wrappers that match the same names;
PEFT refuses them with "Target module Gemma4ClippableLinear(...) is not supported".
Exit 1 with that error on the unpatched stack; 0 on the patched one, where the wrappers keep
their clamps, the LoRA layer sits on the inner Linear, and a training step runs.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, multimodal_config
from transformers import Gemma4ForConditionalGeneration

torch.manual_seed(0)
model = Gemma4ForConditionalGeneration(multimodal_config())
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
try:
    model = get_peft_model(model, config)
except ValueError as exc:
    bug(exc)

wrappers = [
    module
    for name, module in model.named_modules()
    if type(module).__name__ == "Gemma4ClippableLinear"
    and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
]
adapted = [w for w in wrappers if hasattr(w.linear, "lora_A")]
if not wrappers or len(adapted) != len(wrappers):
    raise SystemExit(f"inconclusive: {len(adapted)} of {len(wrappers)} vision projections adapted")
model.train()
input_ids = torch.randint(0, 512, (2, 12))
loss = model(input_ids=input_ids, labels=input_ids).loss
loss.backward()
if not torch.isfinite(loss):
    raise SystemExit(f"inconclusive: loss is {loss}")
fine(f"{len(adapted)} vision projections adapted inside their wrappers; loss {loss.item():.3f}")
