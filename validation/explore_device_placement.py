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
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile

LAYERS = 4
WRAPPERS = ("multimodal", "text")
FORMATS = ("bf16", "int8", "nf4")
CHECKPOINTING = ("gc", "no-gc")
LORA_TARGETS = r"^model\.(language_model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj$"


PLACEMENTS = ("cpu", "disk", "2gpu-cpu")


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


def one_step(wrapper: str, fmt: str, checkpointing: bool, placement: str) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_gemma4 import multimodal_config, text_config
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
    )

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
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        device_map=split_device_map(skeleton, layers_path, gpu, placement),
        offload_folder=tempfile.mkdtemp() if placement == "disk" else None,
        dtype=torch.bfloat16,
        quantization_config=quantization(fmt),
    )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS))
    model.train()
    ids = torch.randint(0, 512, (2, 16), device=gpu)
    extra = {"mm_token_type_ids": torch.zeros_like(ids)} if wrapper == "multimodal" else {}
    loss = model(input_ids=ids, labels=ids, **extra).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    finite = all(g is not None and torch.isfinite(g).all() for g in grads)
    if not torch.isfinite(loss) or not finite:
        return f"no error, but loss {loss.item()} / missing or non-finite LoRA gradients"
    return f"ok (loss {loss.item():.4f})"


def run(wrapper: str, fmt: str, checkpointing: str, placement: str) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--one", wrapper, fmt, checkpointing, placement],
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
    return {
        "wrapper": wrapper,
        "format": fmt,
        "checkpointing": checkpointing,
        "placement": placement,
        "outcome": outcome,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(one_step(argv[1], argv[2], argv[3] == "gc", argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=["cpu"])
    parser.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=CHECKPOINTING)
    args = parser.parse_args(argv)
    for wrapper, fmt, checkpointing, placement in itertools.product(
        WRAPPERS, FORMATS, args.checkpointing, args.placements
    ):
        print(json.dumps(run(wrapper, fmt, checkpointing, placement)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
