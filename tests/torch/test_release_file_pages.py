"""P19: the checkpoint's file pages leave the process's RSS as the loader copies each tensor.

tests/test_torch_suite.py runs this with P19-patched (and P13-patched) transformers first on
PYTHONPATH. The helper's tests need only torch and safetensors; the load test quantizes a
tiny-but-not-trivial MoE checkpoint on the way in (P13), the path whose 26B-A4B load raised
VmHWM by 47.2 GiB on an H200 host although anonymous memory stayed under 0.14 GiB.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers.core_model_loading as loading
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_gemma4 import rss_file, sampling_file_rss, text_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForCausalLM

from patches.inject.release_file_pages import (
    stackpatch_mapped_file,
    stackpatch_page_interior,
    stackpatch_release_file_pages,
)

MIB = 2**20
PAGE = mmap.PAGESIZE
# 32 experts of 256 x 256 (gate_up 512 rows) in 2 layers: 12.6 M expert values, 50 MB in
# float32, so that the pages a load keeps resident stand out from the interpreter's own.
CONFIG = {"num_experts": 32, "moe_intermediate_size": 256, "hidden_size": 256}
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mapped(tmp_path: Path) -> Iterator:
    """A safetensors file of three tensors, opened as transformers opens checkpoints."""
    tensors = {
        "a": torch.randn(1000, 1000),  # 4 MB: starts and ends inside pages shared with b
        "b": torch.randn(777, 1001),
        "c": torch.arange(10, dtype=torch.float32),  # under one page
    }
    save_file(tensors, tmp_path / "three.safetensors")
    with safe_open(str(tmp_path / "three.safetensors"), framework="pt", device="cpu") as handle:
        yield handle, tensors


def test_transformers_is_patched() -> None:
    assert hasattr(loading, "stackpatch_materialize_releasing"), loading.__file__


def test_page_interior_rounds_inwards() -> None:
    assert stackpatch_page_interior(100, 10_000, 4096) == range(4096, 8192)
    assert stackpatch_page_interior(4096, 8192, 4096) == range(4096, 12288)
    assert not stackpatch_page_interior(100, 5000, 4096)  # no whole page inside


def test_only_named_file_mappings_qualify() -> None:
    maps = [
        "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 ",
        "7f0000100000-7f0000200000 rw-p 00000000 fe:00 42 /ckpt/model-00001.safetensors",
        "7f0000200000-7f0000300000 rw-p 00000000 00:05 7 /dev/zero (deleted)",
        "7f0000300000-7f0000400000 rw-p 00000000 00:01 9 /memfd:pool (deleted)",
        "7f0000400000-7f0000500000 rw-p 00000000 fe:00 43 /ckpt/gone.safetensors (deleted)",
        "7f0000500000-7f0000600000 rw-p 00000000 00:00 0 [heap]",
    ]
    base = 0x7F0000000000
    inside = [
        stackpatch_mapped_file(maps, base + i * MIB + 4096, base + i * MIB + 8192) for i in range(6)
    ]
    assert inside == [None, "/ckpt/model-00001.safetensors", None, None, None, None]
    # A range running past the end of its mapping is refused.
    assert stackpatch_mapped_file(maps, base + MIB + 4096, base + 2 * MIB + 4096) is None


def test_anonymous_memory_is_left_alone() -> None:
    tensor = torch.randn(2048, 1024)
    kept = tensor.clone()
    assert stackpatch_release_file_pages(tensor, tensor.to(torch.bfloat16)) == 0
    assert torch.equal(tensor, kept)


def test_a_file_view_the_result_shares_is_left_alone(mapped) -> None:
    handle, _ = mapped
    view = handle.get_slice("a")[...]
    assert stackpatch_release_file_pages(view, view.to(torch.float32)) == 0  # .to(): itself
    assert stackpatch_release_file_pages(view, view[10:20]) == 0


def test_file_pages_are_released_and_read_back_the_same(mapped) -> None:
    handle, tensors = mapped
    view = handle.get_slice("a")[...]
    copy = view.to(torch.bfloat16)  # reads every page of a
    before = rss_file()
    released = stackpatch_release_file_pages(view, copy)
    after = rss_file()
    nbytes = tensors["a"].numel() * 4
    assert nbytes - 2 * PAGE <= released <= nbytes
    assert before - after >= released - 16 * PAGE, (before, after, released)
    assert torch.equal(view, tensors["a"])  # read back from the file


def test_pages_shared_with_a_neighbour_are_kept(mapped) -> None:
    """A page holding the end of a and the start of b stays: b may be a parameter the model
    keeps as a view of the file, and changes made to it live in that page."""
    handle, tensors = mapped
    a, b = handle.get_slice("a")[...], handle.get_slice("b")[...]
    assert a.data_ptr() + a.numel() * 4 == b.data_ptr() and b.data_ptr() % PAGE  # one page
    b.mul_(2)  # the model's own copy-on-write change to its view
    assert stackpatch_release_file_pages(a, a.to(torch.bfloat16)) > 0
    assert torch.equal(b, tensors["b"] * 2)
    assert torch.equal(a, tensors["a"])


def test_tensors_under_one_page_are_left_alone(mapped) -> None:
    handle, _ = mapped
    view = handle.get_slice("c")[...]
    assert stackpatch_release_file_pages(view, view.to(torch.bfloat16)) == 0


def test_a_callers_state_dict_is_not_touched(mapped) -> None:
    """A tensor (not a slice) reaching _materialize_copy belongs to a state dict the caller
    passed: it may carry changes of the caller's in its pages."""
    handle, tensors = mapped
    view = handle.get_slice("a")[...]
    view.add_(1)
    copy = loading._materialize_copy(view, "cpu", torch.float64)
    assert torch.equal(view, tensors["a"] + 1)
    assert torch.equal(copy, (tensors["a"] + 1).double())


# The load: a float32 checkpoint read into bfloat16 with load_in_4bit on CPU, so that every
# tensor is copied out of the file by _materialize_copy (as every tensor is copied to the GPU
# on a GPU load) and the experts are then quantized by P13 from the copy.
def save_checkpoint(path: Path) -> tuple[int, int]:
    """A tiny MoE Gemma 4 in float32 at `path`; returns the bytes its experts take there and
    those of its largest tensor."""
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(text_config(**CONFIG))
    model.save_pretrained(path)
    sizes = {name: p.numel() * 4 for name, p in model.named_parameters()}
    return sum(v for k, v in sizes.items() if ".experts." in k), max(sizes.values())


def load_sampling(path: Path, release: bool, monkeypatch) -> tuple[torch.nn.Module, int]:
    """The model loaded from `path` and the most file-backed memory resident above what was
    before, sampled each time the loader has read a tensor (before P19 releases it, and
    after), with or without P19's release."""
    if not release:  # (unpatched transformers releases nothing either way)
        monkeypatch.setattr(loading, "stackpatch_release_file_pages", lambda *_: 0, raising=False)
    with sampling_file_rss() as sample:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            device_map="cpu",
            dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
    monkeypatch.undo()
    return model, sample.peak


def packed_experts(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        getattr(m, name).data
        for m in model.modules()
        if getattr(m, "_stackpatch_4bit_experts", False)
        for name in ("gate_up_proj", "down_proj")
    ]


def test_file_pages_do_not_accumulate_over_a_load(tmp_path: Path, monkeypatch) -> None:
    expert_bytes, largest = save_checkpoint(tmp_path)
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    load_sampling(tmp_path, True, monkeypatch)  # the interpreter's own code pages, once
    kept, kept_peak = load_sampling(tmp_path, False, monkeypatch)
    released, released_peak = load_sampling(tmp_path, True, monkeypatch)
    print(
        f"checkpoint {file_bytes / MIB:.1f} MiB, experts {expert_bytes / MIB:.1f} MiB; RssFile "
        f"peak above the start: {kept_peak / MIB:.1f} MiB kept, {released_peak / MIB:.1f} MiB "
        "released"
    )
    assert kept_peak >= 0.9 * expert_bytes  # what the test would see without P19
    # Resident at once: the tensor being copied (one of the experts' two tensors of a layer,
    # a third of their bytes here), never what was read before it.
    assert released_peak <= largest + MIB, (released_peak, largest)
    for one, other in zip(packed_experts(kept), packed_experts(released), strict=True):
        assert torch.equal(one, other)
    kept.train(), released.train()  # as test_p13_checkpoint.py compares logits
    with torch.no_grad():
        assert torch.equal(kept(input_ids=IDS).logits, released(input_ids=IDS).logits)
