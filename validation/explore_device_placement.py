"""Search for the device-placement failures the collection's P4-P8 describe.

    python validation/explore_device_placement.py        # one JSON line per set-up (needs a GPU)

Each set-up trains one step (forward + backward) of a tiny Gemma 4 with LoRA on q/k/v/o of
every language-model layer, in its own process, and reports "ok" or the last error line. The
set-ups vary what P4-P8 depend on: the multimodal wrapper or the text model, half of the
layers executed off the GPU ("cpu" in the device_map: accelerate's offload hooks, and for
quantized weights bitsandbytes' `llm_int8_enable_fp32_cpu_offload`), the weight format
(BF16, INT8, NF4) and non-reentrant gradient checkpointing. LoRA on the offloaded layers
needs P14.

Placements (`--placements`, default `cpu`): `cpu` puts the second half of the layers on
"cpu"; `disk` on "disk" (an offload folder); `2gpu-cpu` puts the first half on cuda:0 and
cuda:1 and the second half on "cpu" (needs two GPUs), which is closest to the collection's own
run (multimodal wrapper, two GPUs, CPU offload).

    python validation/explore_device_placement.py --placements disk 2gpu-cpu --checkpointing gc

`auto` lets transformers place the model (`device_map="auto"` with the first of
`tiny_gemma4.load_split`'s GPU budgets that leaves some layers on the GPU and some on "cpu"),
as the collection's own run did; `auto-2gpu` splits that budget over two GPUs. `--recipe
collection` trains as the collection's example does: for quantized weights
`prepare_model_for_kbit_training`, LoRA r=16 on all linear layers, text-only batches (no
`mm_token_type_ids`: needs P10 on transformers 5.5.x) and two AdamW steps. `gc-reentrant` is
reentrant gradient checkpointing. `--trace` names the first module whose forward output is
not finite (the set-ups above ran with weights and inputs far from overflow).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = 4
WRAPPERS = ("multimodal", "text")
FORMATS = ("bf16", "int8", "nf4")
CHECKPOINTING = ("gc", "gc-reentrant", "no-gc")
RECIPES = ("minimal", "collection")
LORA_TARGETS = r"^model\.(language_model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj$"


PLACEMENTS = ("cpu", "disk", "2gpu-cpu", "auto", "auto-2gpu")


def layer_devices(placement: str, layers: int, gpu: str) -> list[str]:
    """Where each decoder layer goes: the first half on the GPU(s), the second half offloaded."""
    half = layers // 2
    if placement == "2gpu-cpu":
        first = ["cuda:0" if i < half // 2 else "cuda:1" for i in range(half)]
        return [*first, *["cpu"] * (layers - half)]
    offload = "disk" if placement == "disk" else "cpu"
    return [*[gpu] * half, *[offload] * (layers - half)]


def split_device_map(skeleton, layers_path: str, gpu: str, placement: str) -> dict[str, str]:
    """Everything on `gpu` except the decoder layers, placed by `layer_devices`."""
    device_map: dict[str, str] = {}

    def walk(module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                devices = layer_devices(placement, len(child), gpu)
                for index in range(len(child)):
                    device_map[f"{full}.{index}"] = devices[index]
            elif layers_path.startswith(full + "."):
                walk(child, full + ".")
            else:
                device_map[full] = gpu

    walk(skeleton, "")
    return device_map


def quantization(fmt: str):
    import torch
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    if fmt == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_enable_fp32_cpu_offload=True,
        )
    return None


def load(checkpoint: str, layers_path: str, fmt: str, placement: str, gpu: str):
    """The saved tiny model loaded with `placement`, and where its decoder layers went."""
    import torch
    from tiny_gemma4 import load_split
    from transformers import AutoConfig, AutoModelForCausalLM

    if placement.startswith("auto"):
        gpus = (0, 1) if placement == "auto-2gpu" else (0,)
        model, _ = load_split(
            checkpoint, quantization(fmt), ("cpu",), gpus=gpus, layers_path=layers_path
        )
        return model, layer_summary(model, layers_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        device_map=split_device_map(skeleton, layers_path, gpu, placement),
        offload_folder=tempfile.mkdtemp() if placement == "disk" else None,
        dtype=torch.bfloat16,
        quantization_config=quantization(fmt),
    )
    return model, layer_summary(model, layers_path)


def layer_summary(model, layers_path: str) -> str:
    """Where each decoder layer sits in hf_device_map, e.g. "0,0,cpu,cpu"."""
    device_map = getattr(model, "hf_device_map", {})
    layers = sorted(
        (int(key[len(layers_path) + 1 :].split(".")[0]), str(device))
        for key, device in device_map.items()
        if key.startswith(layers_path + ".")
    )
    return ",".join(device for _, device in layers) or "one device"


def first_nonfinite_forward(model) -> list[str]:
    """Record, in the returned list, the first module whose forward output is not finite."""
    import torch

    found: list[str] = []

    def check(name: str):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            if not found and floating and not torch.isfinite(tensor).all():
                found.append(f"{name} on {tensor.device}")

        return hook

    for name, module in model.named_modules():
        module.register_forward_hook(check(name))
    return found


def one_step(
    wrapper: str, fmt: str, checkpointing: str, placement: str, recipe: str, trace: bool
) -> str:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tiny_gemma4 import multimodal_config, text_config
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    gpu = "cuda:0" if torch.cuda.is_available() else "cpu"
    types = ["sliding_attention", "full_attention"] * (LAYERS // 2)
    torch.manual_seed(0)
    checkpoint = tempfile.mkdtemp()
    if wrapper == "multimodal":
        config = multimodal_config(num_hidden_layers=LAYERS, layer_types=types)
        Gemma4ForConditionalGeneration(config).save_pretrained(checkpoint)
        layers_path = "model.language_model.layers"
    else:
        Gemma4ForCausalLM(text_config(num_hidden_layers=LAYERS, layer_types=types)).save_pretrained(
            checkpoint
        )
        layers_path = "model.layers"
    model, layers = load(checkpoint, layers_path, fmt, placement, gpu)
    print("hf_device_map:", getattr(model, "hf_device_map", None), file=sys.stderr, flush=True)
    gc_kwargs = {"use_reentrant": checkpointing == "gc-reentrant"}
    if recipe == "collection" and fmt != "bf16":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing != "no-gc",
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif checkpointing != "no-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    if recipe == "collection":
        lora = LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        lora = LoraConfig(r=4, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    model.train()
    nonfinite = first_nonfinite_forward(model) if trace else []
    ids = torch.randint(0, 512, (2, 16), device=gpu)
    extra = {}
    if wrapper == "multimodal" and recipe == "minimal":
        extra = {"mm_token_type_ids": torch.zeros_like(ids)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(2 if recipe == "collection" else 1):
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        # A text batch leaves the vision tower's LoRA (all-linear) without gradients.
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and "vision" not in n]
        finite = all(g is not None and torch.isfinite(g).all() for g in grads)
        if not torch.isfinite(loss) or not finite:
            where = f"; first non-finite forward output: {nonfinite[0]}" if nonfinite else ""
            return (
                f"no error, but loss {loss.item()} / missing or non-finite LoRA gradients"
                f" (layers {layers}){where}"
            )
        losses.append(f"{loss.item():.4f}")
        optimizer.step()
        optimizer.zero_grad()
    return f"ok (loss {' -> '.join(losses)}; layers {layers})"


def run(
    wrapper: str,
    fmt: str,
    checkpointing: str,
    placement: str,
    recipe: str,
    trace: bool,
    log: Path | None = None,
) -> dict:
    one = [wrapper, fmt, checkpointing, placement, recipe, "trace" if trace else "-"]
    completed = subprocess.run(
        [sys.executable, __file__, "--one", *one],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in completed.stderr.splitlines() if line and not line[0].isspace()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    if completed.returncode == 0:
        outcome = completed.stdout.strip().splitlines()[-1]
    else:
        outcome = (errors or lines or [f"exit {completed.returncode}"])[-1]
    if log is not None and not outcome.startswith("ok"):
        with log.open("a") as out:
            out.write(f"### {' '.join(one)}\n{completed.stderr}\n")
    return {
        "wrapper": wrapper,
        "format": fmt,
        "checkpointing": checkpointing,
        "placement": placement,
        "recipe": recipe,
        "outcome": outcome,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        wrapper, fmt, checkpointing, placement, recipe, trace = argv[1:7]
        print(one_step(wrapper, fmt, checkpointing, placement, recipe, trace == "trace"))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=["cpu"])
    parser.add_argument(
        "--checkpointing", nargs="+", choices=CHECKPOINTING, default=["gc", "no-gc"]
    )
    parser.add_argument("--wrappers", nargs="+", choices=WRAPPERS, default=WRAPPERS)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=FORMATS)
    parser.add_argument("--recipe", choices=RECIPES, default="minimal")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--log", type=Path, help="append the stderr of failing set-ups here")
    args = parser.parse_args(argv)
    for wrapper, fmt, checkpointing, placement in itertools.product(
        args.wrappers, args.formats, args.checkpointing, args.placements
    ):
        outcome = run(wrapper, fmt, checkpointing, placement, args.recipe, args.trace, args.log)
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
