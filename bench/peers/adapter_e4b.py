"""experts4bit-qlora (its Python API) on the 26B-A4B checkpoint: one load, every length.

    python bench/peers/adapter_e4b.py --row attn|experts --ckpt CKPT --data DIR --work DIR

Run by bench/peers/run.sh with experts4bit-qlora, grouped-nf4-gemm and bitsandbytes from
their own --target folder, on the machine's stock transformers/peft/accelerate. Its CLI
(`python -m experts4bit_qlora.train`) always downloads a data set, so this calls what the
CLI calls: `prepare_qlora_training(CKPT, QLoRASetup(r=16, alpha=16, ...))` (streaming NF4
load of the expert stacks, BF16 elsewhere, non-reentrant gradient checkpointing, LoRA on
q/k/v/o and, for row experts, per-expert LoRA on the stacks), then the CLI's own
chunked-LM-loss switch (E4B_CHUNKED_LM_LOSS, `auto` by default), then harness.py's loop.
Row experts uses the package's fast path (`expert_kernel="grouped_nf4"`, grouped-nf4-gemm's
fused kernels); row attn must use `expert_kernel="reference"` (the per-expert bitsandbytes
loop): the recipe refuses grouped_nf4 without expert training. The CLI's optimizer is
torch.optim.AdamW; this uses bitsandbytes' AdamW8bit, like the other peers, unless
--optimizer adamw.
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


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = adapter_arguments(__doc__.splitlines()[0], optimizers=("adamw8bit", "adamw"))
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    experts = args.row == "experts"
    kernel = "grouped_nf4" if experts else "reference"
    settings = {
        "setup": f"QLoRASetup(r=16, alpha=16, train_experts={experts}, train_attention=True, "
        f"expert_kernel={kernel!r}), other fields default",
        "optimizer": args.optimizer,
        "loop": "bench/peers/harness.py, no autocast (as the package's CLI)",
        "steps": args.steps,
        "lengths": lengths,
    }
    process = Process("experts4bit-qlora", args.row, settings)
    process.start()
    os.chdir(args.work)
    device = "cuda" if process.cuda else "cpu"
    try:
        started = time.perf_counter()
        from experts4bit_qlora.engines.chunked_lm_loss import (
            CHUNKED_LM_LOSS_STATS,
            chunked_lm_loss_by_default,
            chunked_lm_loss_min_bytes,
            chunked_lm_loss_requested,
            enable_chunked_lm_loss,
        )
        from experts4bit_qlora.recipe import QLoRASetup, prepare_qlora_training

        import_s = time.perf_counter() - started
        setup = QLoRASetup(
            r=16, alpha=16, train_experts=experts, train_attention=True, expert_kernel=kernel
        )
        started = time.perf_counter()
        prepared = prepare_qlora_training(str(args.ckpt), setup, device=device)
        chunk = chunked_lm_loss_requested()
        chunked = 0
        if chunk is not None:  # what `python -m experts4bit_qlora.train` does after loading
            chunked = enable_chunked_lm_loss(
                prepared.model,
                chunk,
                verbose=True,
                min_logits_bytes=chunked_lm_loss_min_bytes(),
                quiet_refusal=chunked_lm_loss_by_default(),
            )
        report = {k: v for k, v in prepared.report.items() if k != "setup"}
        process.loaded(
            time.perf_counter() - started,
            import_s=round(import_s, 2),
            trainable_params=trainable_numel(prepared.trainable),
            e4b_report=report,
            chunked_lm_loss={"patched": chunked, "refused": dict(CHUNKED_LM_LOSS_STATS["refused"])},
            **storage(prepared.model),
        )
    except (Exception, DeadlineReached) as exc:
        process.failed("load", exc)
        return 1
    return train_all(process, prepared.model, prepared.trainable, args, autocast=False)


if __name__ == "__main__":
    sys.exit(main())
