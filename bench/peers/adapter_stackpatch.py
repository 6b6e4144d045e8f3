"""stackpatch: examples/train_gemma4_qlora.py itself, one load for every length.

    python bench/peers/adapter_stackpatch.py --row attn|experts --ckpt CKPT --data DIR --work DIR

Runs the example's `main()` once per length in this process, with the arguments
bench/train_example_26b.sh gives it (`--grad-accum 1`, plus `--lora-experts` for row
experts), on a stack patched by `apply_patches.py --apply` (run.sh does that first and
reverts after). Nothing of the example is edited; only what a benchmark needs is wrapped
around it:

- `load_model` and `add_lora` run for real on the first length; later lengths get the same
  model back, with the LoRA weights copied back to their initial values (as harness.py does
  for the peers), so the 47 GB checkpoint is read once per process, not once per length;
- its Trainer gets one more callback (per-step wall times, synchronized, and the logged
  losses) and a sequential sampler: every trainer sees the shared tokens in file order (all
  rows are statistically alike; the example shuffles them, which changes no timing);
- nothing is written to disk at the end, neither the Trainer's final checkpoint nor the
  adapter (the peers save nothing either; both come after the last timed step);
- `fail()` raises instead of exiting, so a refusal becomes a result line.
The rows the example tokenizes itself are compared with bench/peers/tokens.py's file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # patches/, for the example
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokens as shared_tokens
from harness import (
    adapter_arguments,
    release_memory,
    restore,
    snapshot,
    storage,
    trainable_numel,
)
from measure import DeadlineReached, Process, StepClock, parse_lengths


class ExampleRefused(Exception):
    """The example called fail(): its message is the result."""


class LoadFailed(Exception):
    """Loading failed; the `failed` line is written, no length can run."""


def example_argv(args: Any, length: int) -> list[str]:
    argv = [
        "--model",
        str(args.ckpt),
        "--data",
        str(args.data / f"chat{length}.jsonl"),
        "--output-dir",
        str(args.work / f"stackpatch-{args.row}-{length}"),
        "--max-length",
        str(length),
        "--max-steps",
        str(args.steps),
        "--grad-accum",
        "1",
        "--save-steps",
        "100000",
    ]
    return [*argv, "--lora-experts"] if args.row == "experts" else argv


class Instrumented:
    """The wrappers around the example's functions, and what they saw."""

    def __init__(self, process: Process, example: Any, qlora_training: Any) -> None:
        self.process = process
        self.example = example
        self.base: Any = None
        self.peft: Any = None
        self.initial: list[Any] = []
        self.trainable: list[Any] = []
        self.load_s = 0.0
        self.clock: StepClock = process.clock()
        self.rows_sha256: str | None = None
        self.original = {
            name: getattr(example, name) for name in ("load_model", "add_lora", "build_dataset")
        }
        self.trainer_class = qlora_training.Gemma4QLoRATrainer
        example.load_model = self.load_model
        example.add_lora = self.add_lora
        example.build_dataset = self.build_dataset
        example.fail = self.fail
        measured = self.measured_trainer()
        qlora_training.Gemma4QLoRATrainer = measured  # main() imports it when it runs
        if hasattr(example, "Gemma4QLoRATrainer"):  # in case a later example imports it at the top
            example.Gemma4QLoRATrainer = measured

    @staticmethod
    def fail(message: str, code: int = 2) -> None:
        raise ExampleRefused(message)

    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        if self.base is None:
            started = time.perf_counter()
            try:
                self.base = self.original["load_model"](*args, **kwargs)
            except Exception as exc:
                self.process.failed("load", exc)
                raise LoadFailed from None
            self.load_s = time.perf_counter() - started
        return self.base

    def add_lora(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        if self.peft is None:
            started = time.perf_counter()
            self.peft = self.original["add_lora"](model, *args, **kwargs)
            self.load_s += time.perf_counter() - started
            self.trainable = [p for p in self.peft[0].parameters() if p.requires_grad]
            self.initial = snapshot(self.trainable)
            packed, experts = self.example.experts_in_4bit(model)
            self.process.loaded(
                self.load_s,
                trainable_params=trainable_numel(self.trainable),
                lora_modules=self.peft[1],
                experts_4bit=f"{packed}/{experts}",
                **storage(model),
            )
        else:
            restore(self.trainable, self.initial)
        return self.peft

    def build_dataset(self, *args: Any, **kwargs: Any) -> Any:
        rows, tokenized = self.original["build_dataset"](*args, **kwargs)
        self.rows_sha256 = shared_tokens.rows_digest(rows)
        return rows, tokenized

    def measured_trainer(self) -> type:
        import torch
        from transformers import TrainerCallback

        wrappers = self

        # Tokens of the micro-batches since the last optimizer step, counted on the host from
        # the batches' shapes (every benchmark row is exactly one length long, batch 1, no
        # padding): the example counts them on the device and reads the count only when it
        # logs, which would attribute each step's tokens to the next.
        pending = [0]

        class StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                wrappers.process.reset_peaks()
                pending[0] = 0
                wrappers.clock.start()
                return control

            def on_step_end(self, args, state, control, **kwargs):
                wrappers.clock.step_end(pending[0])
                pending[0] = 0
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    wrappers.clock.losses.append(float(logs["loss"]))
                return control

        class MeasuredTrainer(self.trainer_class):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.add_callback(StepTimes())

            def training_step(self, model, inputs, *args: Any, **kwargs: Any):
                pending[0] += inputs["input_ids"].numel()
                return super().training_step(model, inputs, *args, **kwargs)

            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

            def save_model(self, output_dir=None, _internal_call=False):
                return None

            def _save_checkpoint(self, model, trial):
                return None  # the end-of-training checkpoint (adapter, optimizer, RNG)

        return MeasuredTrainer


def main() -> int:
    args = adapter_arguments(__doc__.splitlines()[0], optimizers=("paged_adamw8bit",)).parse_args()
    lengths = parse_lengths(args.lengths)
    import torch
    import train_gemma4_qlora as example

    # The example's own choice: fused AdamW for attention LoRA, paged 8-bit with the experts.
    optimizer = example.optimizer_name(
        example.parse_args(example_argv(args, lengths[0])), torch.cuda.is_available()
    )
    settings = {
        "script": "examples/train_gemma4_qlora.py main(), one call per length",
        "argv_first_length": example_argv(args, lengths[0]),
        "optimizer": f"{optimizer} (the example's)",
        "gradient_checkpointing": "non-reentrant (the example's)",
        "steps": args.steps,
        "lengths": lengths,
    }
    process = Process("stackpatch", args.row, settings)
    process.start()
    import qlora_training

    wrappers = Instrumented(process, example, qlora_training)
    for length in lengths:
        wrappers.clock = process.clock()
        # Each length's Trainer prepares the same model again; accelerate sees it is prepared
        # (`_is_accelerate_prepared`) and keeps the first bf16 autocast wrapper, once.
        error: BaseException | None = None
        try:
            example.main(example_argv(args, length))
        except LoadFailed:
            return 1
        except (Exception, DeadlineReached) as exc:
            error = exc
        path = shared_tokens.tokens_path(args.data, length)
        expected = shared_tokens.digest_of(path) if path.is_file() else None
        process.length_result(
            length,
            wrappers.clock,
            error,
            tokens_sha256=wrappers.rows_sha256,
            same_tokens_as_peers=wrappers.rows_sha256 == expected,
            optimizer=optimizer,
            autocast_bf16=process.cuda,
        )
        deadline = isinstance(error, DeadlineReached)
        error = None
        release_memory()
        if deadline:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
