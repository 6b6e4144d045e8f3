#!/usr/bin/env python3
"""QLoRA fine-tuning of Gemma 4 (26B-A4B on one 24 GB GPU) on your chat data.

    python examples/train_gemma4_qlora.py --model CKPT_DIR --data chat.jsonl --output-dir run
    python examples/train_gemma4_qlora.py --tiny --output-dir /tmp/tiny   # offline, CPU, seconds
    accelerate launch --num_processes 2 examples/train_gemma4_qlora.py ...  # DDP (or FSDP2)

The environment must be patched by stackpatch (`python apply_patches.py --apply`); the script
checks that first. See README.md, "Training example".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from fast_paths import WIDE_KERNELS, checkpoint_first_layers  # noqa: E402  (after the path set-up above)

# From here the chunked wide-head attention beats SDPA's kernel (bench/results/train_step.md).
CHUNKED_WIDE_FROM = 1024

# Patches the script relies on: text-only batches (P10), for MoE checkpoints the 4-bit experts
# (P13), and LoRA on them (P15). P12 is not needed: LoRA targets only the language model here.
NEEDED_ALWAYS = ("P10",)
NEEDED_FOR_MOE = ("P13",)
NEEDED_FOR_EXPERT_LORA = ("P15",)
# Under DDP, ranks whose hash seed orders the attention types unlike rank 0 get scrambled RoPE.
NEEDED_FOR_DDP = ("P18",)
LORA_ATTENTION = r"^model\.(language_model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj$"
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a Gemma 4 checkpoint directory")
    source.add_argument(
        "--tiny",
        nargs="?",
        const="moe",
        choices=("moe", "dense"),
        help="build a tiny Gemma 4 (MoE by default, or dense) with a tokenizer and chat data",
    )
    parser.add_argument("--data", type=Path, help="JSONL of {'messages': [...]}, or a datasets dir")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=float, default=0.03, help="fraction of steps")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora-experts",
        action="store_true",
        help="also LoRA on the MoE experts (on the packed 4-bit experts; BF16 with --no-4bit)",
    )
    parser.add_argument("--no-4bit", dest="four_bit", action="store_false", help="BF16 base")
    parser.add_argument(
        "--loss",
        choices=("auto", "liger", "chunked"),
        default="auto",
        help="liger-kernel's fused linear cross-entropy or the chunked loss "
        "(auto: liger when it is installed and a GPU is present)",
    )
    parser.add_argument(
        "--liger",
        choices=("auto", "on", "off"),
        # bench/results/train_step.md (H200): liger's RMSNorm and GeGLU kernels were slower than
        # Gemma 4's own (0.86 vs 0.73 ms on 4,096 rows) and add host work to a host-bound step.
        default="off",
        help="liger-kernel's RMSNorm and GeGLU kernels "
        "(auto: when installed and on a GPU; default off)",
    )
    parser.add_argument(
        "--compile-layers",
        action="store_true",
        help="torch.compile each decoder layer (4-bit matmuls and experts stay eager)",
    )
    parser.add_argument(
        "--wide-attention",
        choices=("auto", "sdpa", *WIDE_KERNELS),
        default="auto",
        help="attention kernel of the head_dim-512 global layers (sdpa: as PyTorch picks; "
        f"auto: chunked on a GPU from {CHUNKED_WIDE_FROM:,} tokens, else sdpa)",
    )
    parser.add_argument(
        "--checkpoint-layers",
        type=checkpoint_layers_arg,
        default=None,
        metavar="N|all",
        help="how many decoder layers (the first N) recompute their activations in backward "
        "(default all); the others keep them: faster, more memory",
    )
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-patch-check",
        action="store_true",
        help="train on an unpatched stack (for comparisons only)",
    )
    args = parser.parse_args(argv)
    if args.model and not args.data:
        parser.error("--model needs --data")
    return args


def checkpoint_layers_arg(text: str) -> int | None:
    """--checkpoint-layers: `all` (None) or a count of layers >= 0."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'all', got {text!r}")
    return int(text)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_patched(moe: bool, expert_lora: bool) -> None:
    """Refuse to start on a stack that lacks the patches this run relies on."""
    from patches.api import verify_problems

    needed = NEEDED_ALWAYS + (NEEDED_FOR_MOE if moe else ())
    needed += NEEDED_FOR_EXPERT_LORA if expert_lora else ()
    needed += NEEDED_FOR_DDP if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ()
    problems = verify_problems(set(needed))
    if problems:
        consequence = (
            " Without P13 the experts of a MoE checkpoint stay BF16 (26B-A4B needs ~46 GB "
            "instead of ~14)."
            if any(p.startswith("P13") for p in problems)
            else ""
        )
        fail(
            f"this environment is not patched as the run needs: {'; '.join(problems)}."
            f"{consequence} Fix: python {ROOT / 'apply_patches.py'} --apply --python "
            f"{sys.executable}"
        )


def using_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_model(args: argparse.Namespace, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(args.model)
    quantization = None
    if args.four_bit:
        fsdp = using_fsdp()
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            # FSDP shards flat tensors of one dtype: store the packed weights as BF16 there.
            bnb_4bit_quant_storage=torch.bfloat16 if fsdp else torch.uint8,
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        config=config,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    model.config.use_cache = False
    return model


def check_expert_lora_settings(args: argparse.Namespace, text_config, moe: bool) -> None:
    """What peft's expert LoRA cannot take, refused before the model loads."""
    if not args.lora_experts:
        return
    if not moe:
        fail("--lora-experts needs a MoE checkpoint (this one has no experts)")
    if args.lora_dropout:
        fail(
            f"--lora-dropout {args.lora_dropout} with --lora-experts: LoRA on expert weights "
            "cannot apply dropout (peft's target_parameters); use --lora-dropout 0"
        )
    largest = min(text_config.hidden_size, text_config.moe_intermediate_size)
    if not 0 < args.lora_r <= largest:
        fail(f"--lora-r {args.lora_r} with --lora-experts: one expert's rank is {largest}")


def freeze_towers(model) -> int:
    """Vision/audio towers never train; returns how many tensors were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if "vision" in name or "audio" in name:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def experts_in_4bit(model) -> tuple[int, int]:
    """(expert modules packed to 4 bits by P13, expert modules)."""
    experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
    return sum(bool(getattr(m, "_stackpatch_4bit_experts", False)) for m in experts), len(experts)


def enable_checkpointing(model, count: int | None = None) -> int:
    """Non-reentrant gradient checkpointing, verified on every decoder layer, then switched
    off again past the first `count` layers (all of them when None); returns how many
    layers recompute their activations in backward.

    Each layer left out keeps its activations from forward to backward instead of running
    its forward a second time: the step saves that recompute, on the GPU and on the host,
    whose work per step bounds the 26B-A4B step on an H200 (bench/results/train_step.md)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = [m for m in model.modules() if type(m).__name__ == "Gemma4TextDecoderLayer"]
    if not layers or not all(getattr(m, "gradient_checkpointing", False) for m in layers):
        fail("gradient checkpointing did not switch on for the decoder layers")
    if count is None:
        return len(layers)
    if count > len(layers):
        fail(f"--checkpoint-layers {count}: the model has {len(layers)} decoder layers")
    checkpoint_first_layers(model, count)
    return count


def add_lora(model, args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    extra = {}
    if args.lora_experts:
        extra["target_parameters"] = EXPERT_PARAMETERS
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_ATTENTION,
        task_type="CAUSAL_LM",
        **extra,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. P15 refusing a setting the packed experts cannot take
        fail(" ".join(str(exc).split()))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if ".lora_A" in n}
    leaked = [n for n in wrapped if "vision" in n or "audio" in n]
    if leaked or not wrapped:
        fail(f"LoRA landed outside the language model: {leaked[:3]}")
    return model, len(wrapped)


def optimizer_name(args: argparse.Namespace, cuda: bool) -> str:
    """The Trainer's optimizer for this run.

    LoRA on attention alone is small (26B-A4B, r16: 11.5 M parameters, 92 MB of float32 Adam
    states): 8-bit states would save nearly nothing, while bitsandbytes 0.50's optimizer step
    calls torch.cuda.synchronize() after every parameter (230 syncs a step), so fused AdamW.
    LoRA on the experts as well is 476 M parameters: float32 Adam states would take 3.8 GB of
    a 24 GB card, 8-bit paged ones 0.95 GB. FSDP2's DTensors take the plain AdamW."""
    if using_fsdp() or not cuda:
        return "adamw_torch"
    return "paged_adamw_8bit" if args.lora_experts else "adamw_torch_fused"


def loss_choice(requested: str, problem: str | None) -> str:
    """The loss implementation: liger's fused linear cross-entropy wherever it can run (on an
    H200 3.1x faster than the chunked loss at 2,048 tokens, 0.27 instead of 4.1 GiB of extra
    peak, same loss: bench/results/train_step.md), else the chunked one."""
    if requested == "liger" and problem:
        fail(f"--loss liger: {problem}")
    if requested == "chunked":
        return "chunked"
    return "liger" if problem is None else "chunked"


def wide_attention_choice(requested: str, cuda: bool, max_length: int) -> str:
    """The head_dim-512 layers' attention kernel: `auto` takes the chunked matmul attention on
    a GPU from CHUNKED_WIDE_FROM tokens (on an H200 3.85 vs 8.53 ms per layer at 2,048 tokens
    and 11.2 vs 24.5 at 4,096 against SDPA's memory-efficient kernel, but 2.31 vs 1.48 at
    512), else what SDPA picks."""
    if requested != "auto":
        return requested
    return "chunked" if cuda and max_length >= CHUNKED_WIDE_FROM else "sdpa"


def use_fast_paths(model, args: argparse.Namespace) -> tuple[str, list[str]]:
    """Switch on the fast paths the arguments ask for: (loss implementation, what is on)."""
    import torch
    from fast_paths import compile_decoder_layers, use_liger_kernels, use_wide_head_attention
    from qlora_training import liger_problem

    on = []
    problem = liger_problem()
    if args.liger == "on" and problem:
        fail(f"--liger on: {problem}")
    liger = args.liger == "on" or (args.liger == "auto" and problem is None)
    if liger:
        undo = use_liger_kernels(model)
        on.append(f"liger on {undo.count} norms/MLPs")
    loss = loss_choice(args.loss, problem)
    if loss == "liger":
        on.append("liger fused loss")
    wide = wide_attention_choice(args.wide_attention, torch.cuda.is_available(), args.max_length)
    if wide != "sdpa":
        use_wide_head_attention(model, wide)
        on.append(f"{wide} attention on head_dim 512")
    if args.compile_layers:
        undo = compile_decoder_layers(model)
        on.append(f"compiled {undo.count} decoder layers")
    return loss, on


def build_dataset(args: argparse.Namespace, tokenizer):
    from chat_data import DataProblem, load_conversations, tokenize_conversations

    try:
        tokenized = tokenize_conversations(
            tokenizer, load_conversations(args.data), args.max_length
        )
    except (DataProblem, OSError) as exc:
        fail(str(exc))
    if not tokenized.examples:
        fail(f"{args.data}: no sample has an assistant token within {args.max_length} tokens")
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in tokenized.examples]
    return rows, tokenized


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from tiny import build

        rank = int(os.environ.get("RANK", "0"))
        # Every rank builds the same (seeded) model; in its own folder, so writes never race.
        folder = args.output_dir / ("tiny" if rank == 0 else f"tiny-{rank}")
        args.model, tiny_data = build(folder, moe=args.tiny == "moe")
        args.data = args.data or tiny_data

    import torch
    from qlora_training import Gemma4QLoRATrainer, NonFiniteGuard, ProgressLog, gpu_memory_gib
    from transformers import AutoConfig, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    config = AutoConfig.from_pretrained(args.model)
    text_config = config.get_text_config()
    moe = bool(getattr(text_config, "enable_moe_block", False))
    check_expert_lora_settings(args, text_config, moe)
    if moe and args.four_bit and using_fsdp():
        fail(
            "FSDP with 4-bit experts is not supported: FSDP2 shards P13's packed expert "
            "tensors, which then reach grouped_mm as plain tensors ('strides should be multiple "
            "of 16 bytes'). Use DDP (`accelerate launch --multi_gpu`: every GPU holds the "
            "~13 GiB 4-bit model), or FSDP2 with --no-4bit."
        )
    if not args.skip_patch_check:
        check_patched(moe, expert_lora=moe and args.four_bit and args.lora_experts)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows, tokenized = build_dataset(args, tokenizer)
    model = load_model(args, device)
    packed, experts = experts_in_4bit(model)
    if args.four_bit and packed < experts and not args.skip_patch_check:
        fail(f"only {packed} of {experts} expert layers were quantized to 4 bits (P13)")
    frozen = freeze_towers(model)
    layers = enable_checkpointing(model, args.checkpoint_layers)
    model, lora_modules = add_lora(model, args)
    loss, fast = use_fast_paths(model, args)
    if is_main_process():
        print(
            f"data: {len(rows)} samples, {tokenized.target_tokens} target tokens, "
            f"{tokenized.truncated} truncated to {args.max_length}, {tokenized.dropped} dropped "
            f"(no assistant token left)\nmodel: {type(model.get_base_model()).__name__}, "
            f"{'4-bit NF4' if args.four_bit else 'BF16'}, "
            f"{f'experts 4-bit in {packed}/{experts} layers, ' if moe and args.four_bit else ''}"
            f"{frozen} tower tensors frozen, checkpointing on {layers} layers, "
            f"LoRA on {lora_modules} modules"
            f"{'; ' + ', '.join(fast) if fast else ''}"
        )

    guard = NonFiniteGuard()
    log_path = args.output_dir / "log.jsonl"
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        optim=optimizer_name(args, cuda),
        bf16=cuda,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        # Counted on the device and read once per log (Gemma4QLoRATrainer), and non-finite
        # losses kept out of the logs on the device: the Trainer's own ways read each
        # micro-batch back from the GPU (three syncs).
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        ddp_find_unused_parameters=True,
        seed=args.seed,
        use_cpu=not cuda,
    )
    trainer = Gemma4QLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[guard, ProgressLog(log_path, guard)],
        loss=loss,
        count_tokens_on_device=True,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLog shows and logs the same
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resume = bool(args.resume and any(args.output_dir.glob("checkpoint-*")))
    try:
        result = trainer.train(resume_from_checkpoint=resume or None)
    except KeyboardInterrupt:
        # Ctrl-C: keep what was learnt so far.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        trainer.save_model(str(args.output_dir))
        print(f"\ninterrupted: adapter saved to {args.output_dir}", file=sys.stderr)
        return 130
    trainer.save_model(str(args.output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        summary = {
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "skipped_nonfinite": guard.skipped,
            "gpu_peak_gib": round(gpu_memory_gib(), 3),
            "truncated": tokenized.truncated,
            "dropped": tokenized.dropped,
        }
        (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"adapter saved to {args.output_dir}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
