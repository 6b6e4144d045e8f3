"""P15: LoRA target_parameters on Gemma 4 experts that P13 packed to 4 bits.

Runs on transformers with P13 applied (P15 declares it: --validate applies P13 to its copy of
transformers in both runs). Stock peft wraps the packed tensors, then the first forward fails
inside torch with "Registering a parametrization may not change the dtype of the tensor":
exit 1 with that line. Exit 0 when peft refuses up front with an error that says how to
train LoRA on the experts.
"""

from __future__ import annotations

import torch
import transformers.integrations.bitsandbytes as integration
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, load_in_4bit, text_config

if not hasattr(integration, "stackpatch_prepare_experts_4bit"):
    raise SystemExit("inconclusive: transformers without P13 keeps the experts in BF16")

torch.manual_seed(0)
model = load_in_4bit(text_config())

lora = LoraConfig(
    r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
)
try:
    peft_model = get_peft_model(model, lora)
    # Stock peft wraps the packed tensors without complaint; the forward then fails.
    input_ids = torch.randint(0, 512, (2, 16))
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
except ValueError as exc:
    if "llm_int8_skip_modules" in str(exc):
        fine(str(exc))
    bug(exc)
except Exception as exc:  # whatever peft or torch raise on the way is the bug's face
    bug(exc)
fine(f"LoRA on the packed experts trained (loss {loss.item():.3f}): nothing to refuse")
