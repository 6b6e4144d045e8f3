"""P13: load a Gemma 4 MoE with load_in_4bit and look at what its experts became.

Stock transformers leaves Gemma4TextExperts' fused gate_up_proj/down_proj in BF16 under
BitsAndBytesConfig(load_in_4bit=True) (the 46 GB problem of 26B-A4B). Exit 1 naming the
unquantized tensor on the unpatched stack; 0 on the patched one, where every expert tensor
is packed 4-bit and a LoRA training step through experts and attention runs.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, load_in_4bit, text_config

torch.manual_seed(0)
model = load_in_4bit(text_config())

experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
if not experts:
    raise SystemExit("inconclusive: no Gemma4TextExperts in the model")
for index, module in enumerate(experts):
    for name in ("gate_up_proj", "down_proj"):
        tensor = getattr(module, name)
        if not getattr(tensor, "bnb_quantized", False):
            bug(
                AssertionError(
                    f"layer {index} experts.{name} stays {tensor.dtype} {tuple(tensor.shape)} "
                    f"({tensor.numel() * tensor.element_size()} bytes) under load_in_4bit"
                )
            )

model = get_peft_model(
    model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
)
model.train()
input_ids = torch.randint(0, 512, (2, 16))
loss = model(input_ids=input_ids, labels=input_ids).loss
loss.backward()
lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
if not torch.isfinite(loss) or not lora_grads or not any(g.abs().sum() > 0 for g in lora_grads):
    raise SystemExit(f"inconclusive: loss {loss}, {len(lora_grads)} LoRA gradients")
fine(f"{2 * len(experts)} expert tensors packed 4-bit; LoRA step ran, loss {loss.item():.3f}")
