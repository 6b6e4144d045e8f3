"""P19: every checkpoint page from_pretrained reads stays resident until loading ends.

A tiny Gemma 4 with 48 MiB of MoE experts, saved in float32 and loaded into bfloat16 on CPU:
transformers copies every tensor out of the safetensors file (as it copies every tensor to the
GPU on a GPU load), and the file's mapping stays open until the load ends. The file-backed
memory resident in the process (RssFile) is sampled each time the loader has read a tensor.
Exit 1 when it climbs to most of the checkpoint (unpatched: the pages of every tensor read so
far stay resident); 0 when it never holds more than about the tensor being copied (patched).
Linux only: elsewhere there is no RssFile, and the run says inconclusive.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from tiny_gemma4 import bug, fine, sampling_file_rss, text_config
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM

MIB = 2**20


class PagesStayResident(Exception):
    """Resident file-backed memory grew with everything read, not with what is being read."""


def peak_while_loading(checkpoint: str) -> int:
    """The most file-backed memory resident above the start, sampled after each tensor read."""
    with sampling_file_rss() as sample:
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu", dtype=torch.bfloat16)
    return sample.peak


if not sys.platform.startswith("linux"):
    raise SystemExit("inconclusive: RssFile is Linux's")
# One tensor read at a time (transformers' own switch; by default up to 4 threads read ahead,
# each holding the pages of the tensor it copies): what is resident at once is then one tensor.
os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
torch.manual_seed(0)
checkpoint = tempfile.mkdtemp()
model = Gemma4ForCausalLM(
    text_config(num_experts=32, moe_intermediate_size=256, hidden_size=256)
)  # float32
model.save_pretrained(checkpoint)
file_bytes = (Path(checkpoint) / "model.safetensors").stat().st_size
largest = max(p.numel() * p.element_size() for p in model.parameters())
del model
peak_while_loading(checkpoint)  # the interpreter's own code pages, touched once
peak = peak_while_loading(checkpoint)
measured = (
    f"RssFile rose by up to {peak / MIB:.1f} MiB while loading a {file_bytes / MIB:.1f} MiB "
    f"float32 checkpoint into bfloat16 (its largest tensor {largest / MIB:.1f} MiB)"
)
if peak >= 0.8 * file_bytes:
    bug(PagesStayResident(f"{measured}: every page read stays mapped until loading ends"))
if peak > largest + 2 * MIB:
    raise SystemExit(f"inconclusive: {measured}")
fine(f"{measured}: each tensor's pages leave once it is copied")
