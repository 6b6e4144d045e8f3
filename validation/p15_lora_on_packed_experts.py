"""P15: LoRA target_parameters on Gemma 4 experts that P13 packed to 4 bits.

Runs on transformers with P13 applied (P15 declares it: --validate applies P13 to its copy of
transformers in both runs). Stock peft wraps the packed tensors, then the first forward fails
inside torch with "Registering a parametrization may not change the dtype of the tensor":
exit 1 with that line. Exit 0 when LoRA on the experts (and attention) trains: the loss
falls over a few steps, the expert adapters learn, and the experts stay packed.
"""

from __future__ import annotations

import torch
import transformers.integrations.bitsandbytes as integration
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, load_in_4bit, text_config, train_steps

if not hasattr(integration, "stackpatch_prepare_experts_4bit"):
    raise SystemExit("inconclusive: transformers without P13 keeps the experts in BF16")

torch.manual_seed(0)
model = load_in_4bit(text_config())

lora = LoraConfig(
    r=4,
    target_modules=["q_proj", "v_proj"],
    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
)
try:
    peft_model = get_peft_model(model, lora)
    losses = train_steps(peft_model, steps=6, lr=5e-3, seed=1)
except Exception as exc:  # whatever peft or torch raise on the way is the bug's face
    bug(exc)

experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
expert_b = [p for n, p in peft_model.named_parameters() if "experts" in n and "lora_B" in n]
if not all(getattr(m, "_stackpatch_4bit_experts", False) for m in experts):
    raise SystemExit("inconclusive: the experts were not packed")
if not expert_b or not all(p.abs().sum() > 0 for p in expert_b):
    raise SystemExit(f"inconclusive: the expert adapters did not learn ({len(expert_b)})")
if not losses[-1] < losses[0]:
    raise SystemExit(f"inconclusive: the loss did not fall ({losses})")
fine(
    f"LoRA on {len(expert_b)} packed expert tensors + attention trained: loss "
    f"{losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
)
