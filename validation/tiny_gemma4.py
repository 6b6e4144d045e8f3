"""A tiny Gemma 4, built in code: no hub, no downloads. Shared by the reproducers.

Shapes follow the 26B-A4B layout (MoE block, sliding + full attention, separate global
head dims) at toy sizes, so every code path of the real model runs in well under a second.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "enable_moe_block": True,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 64,
    "vocab_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 16,
    "global_head_dim": 32,
    "sliding_window": 16,
    "hidden_size_per_layer_input": 0,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def text_config(**overrides: Any):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{**TEXT, **overrides})


def multimodal_config(**text_overrides: Any):
    from transformers import Gemma4Config, Gemma4VisionConfig

    return Gemma4Config(
        text_config=text_config(**text_overrides).to_dict(),
        vision_config=Gemma4VisionConfig(**VISION).to_dict(),
        audio_config=None,
    )


def load_in_4bit(config):
    """A tiny Gemma 4 of `config` with random BF16 weights, saved and loaded back on CPU with
    load_in_4bit (NF4, double quantization, BF16 compute): the path a real checkpoint takes."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with tempfile.TemporaryDirectory() as checkpoint:
        Gemma4ForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
        return AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, device_map="cpu", dtype=torch.bfloat16
        )


def _environment() -> dict[str, str]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "device": device}


def bug(exc: BaseException) -> None:
    """The reproducer hit the bug: print its error line and exit 1."""
    # One line, whatever the message's own line breaks: it goes into a table cell.
    line = " ".join("".join(traceback.format_exception_only(type(exc), exc)).split())
    print(json.dumps({"outcome": "bug", "error": line, **_environment()}))
    sys.exit(1)


def fine(note: str = "") -> None:
    """The code path the bug lives on ran cleanly: exit 0."""
    print(json.dumps({"outcome": "fine", "error": note, **_environment()}))
    sys.exit(0)
