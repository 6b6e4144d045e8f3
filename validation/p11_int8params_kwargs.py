"""P11: moving an 8-bit weight that transformers loaded, the way accelerate's hooks do.

transformers marks each loaded parameter with `_is_hf_initialized`; accelerate's
set_module_tensor_to_device (called by its offload hooks on every forward) rebuilds an
Int8Params as `Int8Params(value, requires_grad=..., **old_param.__dict__)`. Before
bitsandbytes 0.50.0, Int8Params.__new__ rejects the extra keyword with TypeError.
Exit 1 with the error on the unpatched stack, 0 on the patched one.
"""

from __future__ import annotations

import tempfile

import torch
from accelerate.utils import set_module_tensor_to_device
from tiny_gemma4 import bug, fine, text_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as checkpoint:
    Gemma4ForCausalLM(text_config()).save_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
layer = model.model.layers[0].self_attn.q_proj
if type(layer.weight).__name__ != "Int8Params":
    raise SystemExit(f"inconclusive: q_proj weight is {type(layer.weight).__name__}")
try:
    set_module_tensor_to_device(
        layer, "weight", torch.device("cpu"), value=layer.weight.data.clone()
    )
except TypeError as exc:
    bug(exc)
if type(layer.weight).__name__ != "Int8Params":
    raise SystemExit("inconclusive: the weight lost its Int8Params type")
fine("Int8Params rebuilt by accelerate")
