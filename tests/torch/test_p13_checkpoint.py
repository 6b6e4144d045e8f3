"""P13's 4-bit checkpoints on CPU: packed experts saved with their quant state and loaded back
without re-quantizing, in a real stack venv.

tests/test_torch_suite.py runs this with P13-patched transformers and P15-patched peft first on
PYTHONPATH; the stack's own, unpatched transformers stays installed underneath, and the
stock-transformers test runs it in a subprocess without the patched copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_gemma4 import multimodal_config, text_config, train_steps
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
)
from transformers.integrations.bitsandbytes import (
    STACKPATCH_CHECKPOINT_GUARD,
    STACKPATCH_QUANT_STATE_ENTRIES,
    StackpatchCheckpointError,
)

from patches.inject.experts_4bit import pack_experts

# Rows of whole 64-value blocks and a router whose outputs bitsandbytes' CPU kernels take.
CONFIG = {"num_experts": 32, "moe_intermediate_size": 64}
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
NF4 = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


def quantization(**settings) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **{**NF4, **settings}
    )


def load(path: Path, **settings) -> torch.nn.Module:
    """From a BF16 checkpoint with load_in_4bit (settings), or from a 4-bit one (none)."""
    config = {"quantization_config": quantization(**settings)} if settings else {}
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", dtype=torch.bfloat16, **config
    )


def experts_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    # Train mode (Gemma 4 has no dropout): in eval mode on CPUs with AVX512-BF16 bitsandbytes
    # repacks each Linear4bit weight for another kernel, which is not what is compared here.
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every packed expert tensor and quant-state tensor, by name."""
    found = {}
    for index, module in enumerate(experts_of(model)):
        for name in EXPERT_PARAMS:
            param = getattr(module, name)
            found[f"{index}.{name}"] = param.data
            for key, value in param.quant_state.as_dict(packed=True).items():
                found[f"{index}.{name}.{key}"] = value
    return found


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Bytes, not values: packed bytes stored as a float dtype include NaN patterns.
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_packed(first: torch.nn.Module, second: torch.nn.Module) -> None:
    one, other = packed_state(first), packed_state(second)
    assert one.keys() == other.keys()
    for key, value in one.items():
        assert value.dtype == other[key].dtype, key
        assert torch.equal(as_bytes(value), as_bytes(other[key])), key


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16")
    Gemma4ForCausalLM(text_config(**CONFIG)).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(bf16, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(a 4-bit checkpoint saved by a model that quantized its BF16 checkpoint on the way in,
    that model)."""
    model = load(bf16, **NF4)
    path = tmp_path_factory.mktemp("nf4")
    model.save_pretrained(path)
    return path, model


def test_transformers_is_patched() -> None:
    import transformers.integrations.bitsandbytes as integration

    assert hasattr(integration, "stackpatch_experts_weight_conversions"), integration.__file__


def test_checkpoint_holds_packed_experts_in_bitsandbytes_layout(saved) -> None:
    path, model = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        for index in range(len(experts_of(model))):
            for name in EXPERT_PARAMS:
                base = f"model.layers.{index}.experts.{name}"
                entries = {k.removeprefix(base + ".") for k in keys if k.startswith(base + ".")}
                assert entries == {*STACKPATCH_QUANT_STATE_ENTRIES} - {
                    "quant_state.bitsandbytes__fp4"
                }
                assert handle.get_slice(base).get_dtype() == "U8"
                state = handle.get_tensor(f"{base}.quant_state.bitsandbytes__nf4")
                described = json.loads(bytes(state.tolist()))
                bf16_shape = tuple(getattr(experts_of(model)[index], name).quant_state.shape)
                assert tuple(described["shape"]) == bf16_shape and len(bf16_shape) == 3
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    assert config["llm_int8_skip_modules"][0] == STACKPATCH_CHECKPOINT_GUARD
    assert "lm_head" in config["llm_int8_skip_modules"]


def expert_bytes(path: Path) -> int:
    """Bytes the experts' tensors (packed weights and quant state) take in the file."""
    sizes = {"U8": 1, "BF16": 2, "F32": 4}
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            if ".experts." in key:
                tensor = handle.get_slice(key)
                shape = tensor.get_shape()
                total += sizes[tensor.get_dtype()] * (
                    int(torch.tensor(shape).prod()) if shape else 1
                )
    return total


@pytest.mark.parametrize(
    "settings",
    [NF4, {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}],
    ids=["nf4-double", "fp4-single"],
)
def test_expert_bytes_on_disk_are_under_three_tenths_of_bf16(bf16, tmp_path, settings) -> None:
    load(bf16, **settings).save_pretrained(tmp_path)
    packed, original = (
        expert_bytes(tmp_path / "model.safetensors"),
        expert_bytes(bf16 / "model.safetensors"),
    )
    assert packed <= 0.3 * original, (packed, original)


def test_reload_restores_the_same_packed_experts_and_logits(saved) -> None:
    path, model = saved
    reloaded = load(path)
    for module in experts_of(reloaded):
        assert module._stackpatch_4bit_experts
        assert module.config._experts_implementation == "bnb_4bit"
        for name in EXPERT_PARAMS:
            param = getattr(module, name)
            assert type(param).__name__ == "Params4bit" and param.bnb_quantized
            assert not param.requires_grad
    assert_same_packed(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_multimodal_model_round_trips(tmp_path) -> None:
    """The released checkpoints are Gemma4ForConditionalGeneration: experts under
    model.language_model, beside a vision tower that stays unquantized."""
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(multimodal_config(**CONFIG)).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    model = load(tmp_path / "bf16", **NF4)
    model.save_pretrained(tmp_path / "nf4")
    with safe_open(str(tmp_path / "nf4" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.language_model.layers.0.experts.gate_up_proj.absmax" in keys
    reloaded = load(tmp_path / "nf4")
    assert type(reloaded).__name__ == "Gemma4ForConditionalGeneration"
    assert all(m._stackpatch_4bit_experts for m in experts_of(reloaded))
    assert_same_packed(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


class _FloatExperts(TorchDispatchMode):
    """Records every op that reads or writes a floating-point tensor holding at least
    `numel` values on a real device (meta placeholders hold no data)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [
            *args,
            *(kwargs or {}).values(),
            *(out if isinstance(out, (list, tuple)) else [out]),
        ]
        for tensor in tensors:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()
                and tensor.device.type != "meta"
                and tensor.numel() >= self.numel
            ):
                self.seen.append((str(func), tuple(tensor.shape), tensor.dtype))
        return out


def test_loading_the_4bit_checkpoint_makes_no_float_copy_of_an_expert(
    bf16, saved, monkeypatch
) -> None:
    """Every op of the load, in one thread, watched: quantizing on the way in reads each
    expert in BF16; loading the 4-bit checkpoint never touches an expert-sized float tensor."""
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # the watch sees the calling thread
    config = text_config(**CONFIG)
    smallest_expert = config.num_experts * config.hidden_size * config.moe_intermediate_size
    with _FloatExperts(smallest_expert) as quantizing:
        load(bf16, **NF4)
    assert any("quantize_4bit" in op for op, _, _ in quantizing.seen), quantizing.seen
    with _FloatExperts(smallest_expert) as reloading:
        load(saved[0])
    assert reloading.seen == []


@pytest.mark.parametrize(
    "settings",
    [
        {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
        {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
        {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
        {**NF4, "bnb_4bit_quant_storage": torch.bfloat16},
        {**NF4, "bnb_4bit_quant_storage": torch.float32},
    ],
    ids=["fp4", "nf4-single", "fp4-double", "storage-bf16", "storage-f32"],
)
def test_quant_settings_round_trip(bf16, tmp_path, settings) -> None:
    model = load(bf16, **settings)
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    storage = settings.get("bnb_4bit_quant_storage", torch.uint8)
    for module in experts_of(reloaded):
        for name in EXPERT_PARAMS:
            param = getattr(module, name)
            assert param.dtype == storage and param.quant_storage == storage
            assert param.quant_state.quant_type == settings["bnb_4bit_quant_type"]
            assert param.quant_state.nested == settings["bnb_4bit_use_double_quant"]
    assert_same_packed(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def rewrite(source: Path, dest: Path, change) -> Path:
    """A copy of checkpoint `source` whose tensors `change(tensors)` edited in place."""
    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    change(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_blocksize_is_read_from_the_checkpoint(bf16, saved, tmp_path) -> None:
    """transformers has no blocksize setting; a checkpoint quantized with another blocksize
    (bitsandbytes' default on ROCm is 128) loads with its own."""
    original = load_file(bf16 / "model.safetensors")

    def blocksize_128(tensors: dict) -> None:
        for key in [k for k in tensors if ".experts." in k]:
            del tensors[key]
        for key, weight in original.items():
            if ".experts." in key:
                packed = pack_experts(weight, blocksize=128)
                tensors[key] = packed.data
                for entry, value in packed.state.as_dict(packed=True).items():
                    tensors[f"{key}.{entry}"] = value

    reloaded = load(rewrite(saved[0], tmp_path / "bs128", blocksize_128))
    experts = experts_of(reloaded)[0]
    state = experts.gate_up_proj.quant_state
    assert state.blocksize == 128
    expected = pack_experts(original["model.layers.0.experts.gate_up_proj"], blocksize=128)
    assert torch.equal(
        dequantize_4bit(experts.gate_up_proj.data, state),
        dequantize_4bit(expected.data, expected.state),
    )
    assert torch.isfinite(logits(reloaded)).all()


def test_reloaded_model_trains_lora_on_attention_and_packed_experts(saved) -> None:
    model = get_peft_model(
        load(saved[0]),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),
    )
    losses = train_steps(model, steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    expert_b = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_b and all(p.abs().sum() > 0 for p in expert_b)
    assert all(m._stackpatch_4bit_experts for m in experts_of(model))


def test_reloaded_model_saves_again_and_dequantizes(saved, tmp_path) -> None:
    path, _ = saved
    reloaded = load(path)
    reloaded.save_pretrained(tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes(), name
    expected = {
        name: dequantize_4bit(
            getattr(experts_of(reloaded)[0], name).data,
            getattr(experts_of(reloaded)[0], name).quant_state,
        )
        for name in EXPERT_PARAMS
    }
    # The dtype is given: after save_pretrained, transformers (5.5.4 and 5.23.0 alike) leaves
    # config.dtype as the string "bfloat16", and dequantize() without one then fails in
    # tensor.to("bfloat16") ("Invalid device string"), for Linear4bit layers too.
    reloaded.dequantize(dtype=torch.bfloat16)
    for name in EXPERT_PARAMS:
        weight = getattr(experts_of(reloaded)[0], name)
        assert type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16
        assert torch.equal(weight, expected[name].to(torch.bfloat16))
    reloaded.save_pretrained(tmp_path / "bf16")
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(logits(plain), logits(reloaded))


def test_float_experts_in_a_4bit_checkpoint_are_quantized_on_the_way_in(
    bf16, saved, tmp_path
) -> None:
    """A 4-bit checkpoint stock transformers wrote keeps Gemma 4's experts BF16: P13 packs
    them as it loads, as from a BF16 checkpoint."""
    path, model = saved
    original = load_file(bf16 / "model.safetensors")

    def float_experts(tensors: dict) -> None:
        for key in [k for k in tensors if ".experts." in k]:
            del tensors[key]
        tensors.update({k: v for k, v in original.items() if ".experts." in k})

    stock_like = rewrite(path, tmp_path / "stock-like", float_experts)
    config = json.loads((stock_like / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = None
    (stock_like / "config.json").write_text(json.dumps(config))
    reloaded = load(stock_like)
    assert all(m.gate_up_proj.bnb_quantized for m in experts_of(reloaded))
    assert_same_packed(model, reloaded)


def test_skipped_experts_save_and_reload_in_bf16_without_the_guard(bf16, tmp_path) -> None:
    model = load(bf16, llm_int8_skip_modules=["experts", "lm_head"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["experts", "lm_head"]
    reloaded = load(tmp_path)
    for ours, theirs in zip(experts_of(model), experts_of(reloaded), strict=True):
        assert type(theirs.gate_up_proj) is torch.nn.Parameter
        assert torch.equal(ours.gate_up_proj, theirs.gate_up_proj)


def stock_environment() -> dict[str, str]:
    """This interpreter's environment without the patched transformers on PYTHONPATH."""
    patched = Path(transformers.__file__).resolve().parents[1]
    kept = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if Path(p).resolve() != patched]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}


STOCK_LOAD = """
import sys, torch, transformers.integrations.bitsandbytes as integration
from transformers import AutoModelForCausalLM
assert not hasattr(integration, "stackpatch_experts_weight_conversions"), integration.__file__
AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.bfloat16)
"""


def test_stock_transformers_refuses_the_checkpoint_naming_p13(saved) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(saved[0])],
        capture_output=True,
        text=True,
        env=stock_environment(),
        check=False,
    )
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("re.error: bad character in group name 'stackpatch P13: "), last
    assert "Loading weights" not in completed.stderr  # refused before reading any weight


def truncate(tensors_path: Path) -> None:
    data = tensors_path.read_bytes()
    tensors_path.write_bytes(data[: len(data) // 2])


def drop(entry: str):
    def change(tensors: dict) -> None:
        del tensors[f"model.layers.1.experts.down_proj.{entry}"]

    return change


def edit_state(**fields):
    def change(tensors: dict) -> None:
        key = "model.layers.0.experts.gate_up_proj.quant_state.bitsandbytes__nf4"
        state = {**json.loads(bytes(tensors[key].tolist())), **fields}
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    return change


def halve_packed(tensors: dict) -> None:
    key = "model.layers.0.experts.gate_up_proj"
    tensors[key] = tensors[key][: tensors[key].shape[0] // 2].clone()


def garbage_state(tensors: dict) -> None:
    key = "model.layers.0.experts.gate_up_proj.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.full((40,), 0xFF, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (None, "not a complete safetensors file"),
        (drop("absmax"), "the absmax entry is missing"),
        (drop("quant_state.bitsandbytes__nf4"), "expected one quant_state.bitsandbytes__"),
        (edit_state(shape=[64, 64, 64]), "holds experts of shape (64, 64, 64)"),
        (edit_state(blocksize=100), "unknown quant type or blocksize"),
        (halve_packed, "packed bytes cannot hold"),
        (garbage_state, "not readable JSON"),
    ],
    ids=["truncated", "no-absmax", "no-state", "shape", "blocksize", "short-packed", "garbage"],
)
def test_a_damaged_shard_fails_in_one_line_before_loading(saved, tmp_path, change, words) -> None:
    if change is None:
        damaged = tmp_path / "damaged"
        shutil.copytree(saved[0], damaged)
        truncate(damaged / "model.safetensors")
    else:
        damaged = rewrite(saved[0], tmp_path / "damaged", change)
    with pytest.raises(StackpatchCheckpointError) as raised:
        load(damaged)
    message = str(raised.value)
    assert message.startswith("stackpatch P13: ") and words in message, message
    assert "\n" not in message


def test_the_gpu_benchmark_runs_on_a_tiny_model(tmp_path) -> None:
    """bench/quantized_checkpoint.py, which measures the 26B-A4B model on a GPU, end to end on
    CPU with a tiny model: the stages run, the 4-bit reloads match, the results are written,
    and --profile profiles one more 4-bit load."""
    script = Path(__file__).resolve().parents[2] / "bench" / "quantized_checkpoint.py"
    folders = {name: tmp_path / name for name in ("bf16", "nf4", "work", "results")}
    arguments = [f"--{name}={path}" for name, path in folders.items()]
    completed = subprocess.run(
        [
            sys.executable,
            str(script),
            "--tiny",
            "--no-warm",
            "--profile",
            *arguments,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((folders["results"] / "quantized_checkpoint.json").read_text())
    assert result["targets"]["logits_equal"] and result["targets"]["checkpoint_size_met"]
    assert result["runs"]["nf4-cold"]["expert_tensor_types"] == ["Params4bit"]
    assert (
        "| load time (from_pretrained) |"
        in (folders["results"] / "quantized_checkpoint.md").read_text()
    )
    profile = (folders["results"] / "load-profile-nf4-warm.txt").read_text()
    assert "from_pretrained under cProfile" in profile and "cumulative" in profile


def test_skipping_packed_experts_is_refused_in_one_line(saved, tmp_path) -> None:
    """A packed checkpoint whose config keeps the experts unquantized cannot be loaded."""
    edited = tmp_path / "edited"
    shutil.copytree(saved[0], edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"].append("experts")
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(StackpatchCheckpointError, match="the model's are not packed") as raised:
        load(edited)
    assert "\n" not in str(raised.value)
