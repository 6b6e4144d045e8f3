"""The whole Gemma 4 26B-A4B text model, random weights, loaded with load_in_4bit.

    python bench/whole_model_memory.py make --dir CKPT   # one layer at a time
    python bench/whole_model_memory.py load --dir CKPT --label stock|patched

`load` reports, as one JSON line: resident GPU memory after from_pretrained, the peak while
loading, the load time, what the experts became, and for a LoRA (r=16, attention) training
step with non-reentrant gradient checkpointing at sequence 512 and 2,048 (batch 1): peak GPU
memory and tokens/s. Run `load` once per stack (stock transformers, or with P13 applied) in
separate processes so the peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# The 26B-A4B text config (DEVELOPERS.md): every 6th layer full attention.
CONFIG_26B_A4B = {
    "hidden_size": 2816,
    "num_hidden_layers": 30,
    "intermediate_size": 2112,
    "moe_intermediate_size": 704,
    "enable_moe_block": True,
    "num_experts": 128,
    "top_k_experts": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "vocab_size": 262144,
    "sliding_window": 1024,
    "attention_k_eq_v": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size_per_layer_input": 0,
    "layer_types": [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)
    ],
    "tie_word_embeddings": True,
}
GIB = 2**30


def make(directory: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    directory.mkdir(parents=True, exist_ok=True)
    config = Gemma4TextConfig(**CONFIG_26B_A4B)
    config.architectures = ["Gemma4ForCausalLM"]
    config.save_pretrained(directory)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    shapes = {k: (v.shape, v.dtype) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        group = ".".join(parts[:3]) if parts[1] == "layers" else "other"
        groups.setdefault(group, []).append(key)
    weight_map, total = {}, 0
    generator = torch.Generator(device="cuda").manual_seed(0)
    for index, (_, keys) in enumerate(sorted(groups.items())):
        shard = {}
        for key in keys:
            shape, dtype = shapes[key]
            if dtype.is_floating_point:
                value = torch.randn(shape, device="cuda", generator=generator, dtype=torch.bfloat16)
                if key.endswith(("norm.weight", "layer_scalar", "scale")):
                    value = torch.ones_like(value)  # norms and scales near 1 keep activations sane
                else:
                    value = value * 0.02
            else:
                value = torch.zeros(shape, dtype=dtype)
            shard[key] = value.cpu().contiguous()
            total += shard[key].numel() * shard[key].element_size()
        name = f"model-{index:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file))
    print(json.dumps({"checkpoint_gib": round(total / GIB, 2), "shards": len(groups)}))


def train_step(model, tokens: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, CONFIG_26B_A4B["vocab_size"], (1, tokens), device="cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return {
        "tokens": tokens,
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "tokens_per_s": round(tokens / min(times[1:]), 1),
        "loss": round(loss.item(), 3),
    }


def load(directory: Path, label: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, device_map={"": 0}, dtype=torch.bfloat16
    )
    load_s = time.perf_counter() - start
    torch.cuda.synchronize()
    report = {
        "label": label,
        "device": torch.cuda.get_device_name(0),
        "load_s": round(load_s, 1),
        "resident_gib": round(torch.cuda.memory_allocated() / GIB, 2),
        "loading_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
    }
    experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
    report["expert_tensor_types"] = sorted({type(m.gate_up_proj).__name__ for m in experts})
    report["experts_implementation"] = experts[0].config._experts_implementation
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model.train()
    report["training"] = []
    for tokens in (512, 2048):
        try:
            report["training"].append(train_step(model, tokens))
        except torch.OutOfMemoryError as exc:
            report["training"].append({"tokens": tokens, "error": str(exc).splitlines()[0]})
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("make", "load"))
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--label", default="stock")
    args = parser.parse_args()
    if args.mode == "make":
        make(args.dir)
    else:
        load(args.dir, args.label)


if __name__ == "__main__":
    main()
