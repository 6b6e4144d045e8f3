"""P20: from_pretrained deep-copies a weight converter for every checkpoint key it matches.

A tiny Gemma 4 quantized to 4 bits on CPU (bitsandbytes NF4, double quantization) and saved:
each Linear4bit's weight is stored as six entries (the packed bytes and its quant state),
which the 4-bit deserialization converter gathers back into one parameter. The reload watches
the WeightConverter copies transformers' loader makes and which of them are handed a tensor
(`add_tensor`): a copy that never is was made for nothing.
Exit 1 when copies are thrown away (unpatched: one copy per checkpoint key, all but the first
of each parameter discarded); 0 when every copy is kept (patched).
"""

from __future__ import annotations

import tempfile

import torch
import transformers.core_model_loading as loading
from tiny_gemma4 import bug, fine, load_in_4bit, text_config
from transformers import AutoModelForCausalLM


class ConverterCopiedPerKey(Exception):
    """The loader copied a converter for every checkpoint key, not once per parameter."""


def copies_while_loading(checkpoint: str) -> tuple[int, int]:
    """(WeightConverter copies the loader made, how many of them it never used)."""
    original_copy, original_add = loading.deepcopy, loading.WeightConverter.add_tensor
    copies: list = []  # held, so that no two copies share an id
    used: set[int] = set()

    def watched_copy(value, *args, **kwargs):
        copy = original_copy(value, *args, **kwargs)
        if isinstance(copy, loading.WeightConverter):
            copies.append(copy)
        return copy

    def watched_add(self, *args, **kwargs):
        used.add(id(self))
        return original_add(self, *args, **kwargs)

    loading.deepcopy, loading.WeightConverter.add_tensor = watched_copy, watched_add
    try:
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu", dtype=torch.bfloat16)
    finally:
        loading.deepcopy, loading.WeightConverter.add_tensor = original_copy, original_add
    return len(copies), sum(id(copy) not in used for copy in copies)


torch.manual_seed(0)
model = load_in_4bit(text_config())
packed = sum(type(p).__name__ == "Params4bit" for p in model.parameters())
with tempfile.TemporaryDirectory() as checkpoint:
    model.save_pretrained(checkpoint)
    del model
    copies, thrown_away = copies_while_loading(checkpoint)
measured = (
    f"{copies} WeightConverter deep copies to load {packed} packed 4-bit parameters, "
    f"{thrown_away} of them never used"
)
if thrown_away:
    bug(ConverterCopiedPerKey(f"{measured}: a copy per checkpoint key, one kept per parameter"))
if copies < packed:
    raise SystemExit(f"inconclusive: {measured}")
fine(f"{measured}: one copy per converted parameter")
