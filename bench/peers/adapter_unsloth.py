"""unsloth (FastModel, 4-bit) on the 26B-A4B checkpoint: one load, every length.

    python bench/peers/adapter_unsloth.py --row attn|experts --ckpt CKPT --data DIR --work DIR

Run by bench/peers/run.sh with unsloth, unsloth_zoo, trl, datasets, dill, multiprocess and
bitsandbytes from their own --target folder on PYTHONPATH, on the machine's stock
transformers/peft/accelerate (stackpatch reverted). Settings: `FastModel.from_pretrained(
load_in_4bit=True)` (NF4, BF16 compute; unsloth_zoo quantizes the fused experts to 4 bits at
load), `FastModel.get_peft_model` r16 α16 dropout 0 on q/k/v/o with `target_parameters=[]`
(row attn) or the two expert parameters (row experts), unsloth's gradient checkpointing
(`use_gradient_checkpointing="unsloth"`, its default and recommendation; PEERS_UNSLOTH_GC
overrides), bitsandbytes' AdamW8bit (what unsloth's notebooks name, `optim="adamw_8bit"`),
and harness.py's loop.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    adapter_arguments,
    storage,
    train_all,
    trainable_numel,
)
from measure import DeadlineReached, Process, parse_lengths

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",  # its one routine call home (peers-offline.md)
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def main() -> int:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    args = adapter_arguments(__doc__.splitlines()[0]).parse_args()
    lengths = parse_lengths(args.lengths)
    checkpointing = os.environ.get("PEERS_UNSLOTH_GC", "unsloth")
    gc_value: str | bool = {"true": True, "false": False}.get(checkpointing.lower(), checkpointing)
    targets = EXPERT_PARAMETERS if args.row == "experts" else []
    settings = {
        "from_pretrained": "FastModel.from_pretrained(load_in_4bit=True, dtype=bfloat16, "
        f"max_seq_length={max(lengths)}, local_files_only=True)",
        "lora": f"r=16 alpha=16 dropout=0 target_modules={ATTENTION} target_parameters={targets}",
        "gradient_checkpointing": repr(gc_value),
        "optimizer": args.optimizer,
        "loop": "bench/peers/harness.py, forward under autocast(bfloat16) as unsloth's trainer",
        "steps": args.steps,
        "lengths": lengths,
    }
    process = Process("unsloth", args.row, settings)
    process.start()
    os.chdir(args.work)  # unsloth writes unsloth_compiled_cache/ into the working directory
    try:
        started = time.perf_counter()
        import torch
        import unsloth
        from unsloth import FastModel

        import_s = time.perf_counter() - started
        started = time.perf_counter()
        model, _tokenizer = FastModel.from_pretrained(
            model_name=str(args.ckpt),
            max_seq_length=max(lengths),
            dtype=torch.bfloat16,
            load_in_4bit=True,
            full_finetuning=False,
            local_files_only=True,
        )
        loaded_s = time.perf_counter() - started
        model = FastModel.get_peft_model(
            model,
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            target_modules=ATTENTION,
            target_parameters=targets,
            use_gradient_checkpointing=gc_value,
            random_state=0,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        process.loaded(
            time.perf_counter() - started,
            from_pretrained_s=round(loaded_s, 2),
            import_s=round(import_s, 2),
            unsloth=getattr(unsloth, "__version__", None),
            trainable_params=trainable_numel(trainable),
            lora_modules=sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A")),
            **storage(model),
        )
    except (Exception, DeadlineReached) as exc:
        process.failed("load", exc)
        return 1
    return train_all(process, model, trainable, args, autocast=True)


if __name__ == "__main__":
    sys.exit(main())
