"""P16: load_in_4bit / load_in_8bit with device_map="auto" offloading layers, then LoRA.

BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True) and a memory budget smaller than
the model, as a 24 GB card makes it for 26B-A4B: transformers quantizes the layers the
resolved map offloads as well, and accelerate cannot offload bitsandbytes weights. On a GPU
(layers on "cpu"): NF4 fails in the first forward, INT8 in the first backward. On a CPU-only
machine (layers on "disk"; NF4 only, as CPU int8 needs bitsandbytes >= 0.50) the step runs
but the LoRA gradients come back missing or not finite.
Exit 1 with the first failure on the unpatched stack; 0 on the patched one, where the
offloaded layers hold float nn.Linear, the others bitsandbytes ones, and one LoRA step gives
a finite loss and finite gradients.
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tiny_gemma4 import bug, fine, load_split, text_config
from transformers import BitsAndBytesConfig, Gemma4ForCausalLM

torch.manual_seed(0)
checkpoint = tempfile.mkdtemp()
config = text_config(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
Gemma4ForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
on_gpu = torch.cuda.is_available()
device = "cuda:0" if on_gpu else "cpu"
# Part of the model fits; the later decoder layers go to "cpu" (GPU) or "disk" (CPU).
OFFLOADED = ("cpu", "disk") if on_gpu else ("disk",)
QUANTIZATION = {
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True),
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_enable_fp32_cpu_offload=True,
    ),
}
BNB_LINEAR = ("Linear8bitLt", "Linear4bit")


class SilentFailure(Exception):
    """Training ran without an error but the adapters did not get usable gradients."""


def train_one_step(fmt: str) -> str:
    model, placed = load_split(checkpoint, QUANTIZATION[fmt], OFFLOADED)
    offloaded = [k for k, v in placed.items() if v in OFFLOADED]
    resident = [k for k, v in placed.items() if v not in OFFLOADED]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    input_ids = torch.randint(0, 512, (2, 12), device=device)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    base = model.base_model.model

    def kind(layer: str) -> str:
        return type(base.get_submodule(f"{layer}.self_attn.q_proj").base_layer).__name__

    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    missing = sum(g is None for g in grads.values())
    nonfinite = sum(g is not None and not torch.isfinite(g).all() for g in grads.values())
    if not torch.isfinite(loss) or missing or nonfinite:
        raise SilentFailure(
            f"{fmt}: no error, loss {loss.item():.4f}, but of {len(grads)} LoRA B gradients "
            f"{missing} missing and {nonfinite} not finite"
        )
    # On a CPU-only machine "cpu" is where the model runs: transformers keeps all of it float.
    quantized_resident = not on_gpu or kind(resident[0]) in BNB_LINEAR
    if any(kind(k) in BNB_LINEAR for k in offloaded) or not quantized_resident:
        raise SystemExit(f"inconclusive: {fmt} layers {[(k, kind(k)) for k in placed]}")
    return f"{fmt}: {len(offloaded)} offloaded layers float, loss {loss.item():.4f}"


notes = []
for fmt in ("nf4", "int8") if on_gpu else ("nf4",):
    try:
        notes.append(train_one_step(fmt))
    except (AttributeError, NotImplementedError, RuntimeError, SilentFailure) as exc:
        bug(exc)
fine("; ".join(notes))
