"""A tiny Gemma 4, built in code: no hub, no downloads. Shared by the reproducers.

Shapes follow the 26B-A4B layout (MoE block, sliding + full attention, separate global
head dims) at toy sizes, so every code path of the real model runs in well under a second.

The sizes are ones bitsandbytes' CPU kernels take on every x86 CPU, as the real model's are
(issue 16): every Linear that load_in_4bit quantizes has out_features a multiple of 32 (on
CPUs with AVX512-BF16 an eval-mode Linear4bit repacks its weight in tiles of 32 rows and
asserts that; hence 32 experts for the router) and in_features a multiple of the blocksize
64, as are the experts' rows (on CPUs with AVX-512F, bitsandbytes 0.49+ dequantizes rows
that are not whole blocks with the wrong scales: P17). Tests about those limits use their
own shapes.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "enable_moe_block": True,
    "num_experts": 32,
    "top_k_experts": 2,
    "moe_intermediate_size": 64,
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
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
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


def train_steps(model, steps: int, lr: float, seed: int = 2) -> list[float]:
    """`steps` AdamW steps of a causal LM on one fixed random batch (4 x 16 token ids below
    the tiny vocabulary, its own labels); the losses, one per step."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# Fractions of the model's unquantized size tried as the memory budget of `load_split`: accelerate
# reserves room for the largest layer, and quantized layers are smaller, so one fraction
# does not split every format.
SPLIT_BUDGETS = (0.5, 0.65, 0.8, 0.35, 0.25, 0.15, 0.1)


def load_split(
    checkpoint: str,
    quantization,
    offload_devices: tuple[str, ...],
    dtype=None,
    gpus: tuple[int, ...] = (0,),
    layers_path: str = "model.layers",
):
    """Load a saved tiny Gemma 4 with device_map="auto" and a budget (shared by `gpus`) that
    puts some decoder layers on `offload_devices` and some not; return the model and
    {layer: device}."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    dtype = dtype or torch.bfloat16
    size = sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize
    on_gpu = torch.cuda.is_available()
    for fraction in SPLIT_BUDGETS:
        budget = int(size * fraction)
        per_gpu = dict.fromkeys(gpus, budget // len(gpus))
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            device_map="auto",
            max_memory={**per_gpu, "cpu": 2**34} if on_gpu else {"cpu": budget},
            offload_folder=tempfile.mkdtemp(),
            quantization_config=quantization,
            dtype=dtype,
        )
        placed = {
            k: str(v)
            for k, v in getattr(model, "hf_device_map", {}).items()
            if k.startswith(layers_path + ".")
        }
        devices = {v in offload_devices for v in placed.values()}
        if devices == {True, False}:
            return model, placed
    raise SystemExit(f"inconclusive: no memory budget split the decoder layers ({placed})")


def rss_file() -> int:
    """Bytes of file-backed memory resident in this process (Linux's RssFile): pages of
    mapped files, such as a safetensors checkpoint being loaded, that the process has read."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssFile in /proc/self/status")


@dataclass
class FileRssPeak:
    """The most file-backed memory resident above `base`, sampled while loading."""

    base: int
    peak: int = 0


@contextmanager
def sampling_file_rss() -> Iterator[FileRssPeak]:
    """Samples RssFile each time transformers' loader has read a tensor (after its copy, before
    P19 gives the pages back), for the loads inside the block."""
    import transformers.core_model_loading as loading

    materialize = loading._materialize_copy
    sample = FileRssPeak(rss_file())

    def sampled(tensor, device=None, dtype=None):
        result = materialize(tensor, device, dtype)
        sample.peak = max(sample.peak, rss_file() - sample.base)
        return result

    loading._materialize_copy = sampled
    try:
        yield sample
    finally:
        loading._materialize_copy = materialize


def cpu_has_avx512f() -> bool:
    """Whether bitsandbytes' native CPU library takes its AVX-512 branches on this machine
    (it asks `__builtin_cpu_supports("avx512f")`; P17's bug lives there)."""
    from pathlib import Path

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: bitsandbytes' macOS and Windows builds have no AVX-512 branch
        return False
    flags = (
        line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")
    )
    return any("avx512f" in line for line in flags)


def plain_dequantize_4bit(data, state):
    """What bitsandbytes' dequantize_4bit should return, in plain torch: each 4-bit code
    (high nibble first) looked up and times the absmax of its block, blocks taken over the
    flattened tensor as quantize_4bit made them (a tensor of whole blocks). No native kernel
    involved, so it is the same on every CPU."""
    import torch
    from bitsandbytes.functional import dequantize_blockwise

    absmax = state.absmax
    if state.nested:  # double quantization: the 8-bit absmax kernel is flat, right everywhere
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = data.view(torch.uint8).flatten()
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten().long()
    values = state.code.float()[codes].view(-1, state.blocksize) * absmax.float().view(-1, 1)
    return values.view(state.shape).to(state.dtype)


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
