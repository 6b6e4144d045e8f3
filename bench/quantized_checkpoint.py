"""Gemma 4 26B-A4B (random weights): quantizing the BF16 checkpoint on the way in and saving
it in 4 bits (P13), against loading that 4-bit checkpoint.

    python3 apply_patches.py --apply -q
    python3 bench/quantized_checkpoint.py --results "$OUT"        # on the GPU machine
    python3 bench/quantized_checkpoint.py --tiny --results DIR      # a tiny model on CPU

Makes the BF16 checkpoint first if --bf16 has none (bench/whole_model_memory.py make). Each
load runs in its own process, after a baseline taken once torch, transformers and the
device are initialised:
- bf16-cold: the BF16 checkpoint, evicted from the page cache, loaded with load_in_4bit
  (NF4, double quantization, BF16 compute): P13 quantizes the experts as they load; then
  save_pretrained writes the 4-bit checkpoint to --nf4 (atomically: a .partial folder,
  renamed when complete), with the BF16 folder's tokenizer files so training runs can start
  from it (`CKPT=<--nf4> LABELS=patched bash bench/train_example_26b.sh`);
- nf4-cold: the 4-bit checkpoint, evicted from the page cache, loaded as saved;
- bf16-warm and nf4-warm: the same loads again with the files in the page cache.
For each: wall time of from_pretrained, the GPU allocator's peak while loading, the host's
peak RSS above the baseline (VmHWM, reset after the baseline; and the peaks of anonymous and
file-backed RSS sampled every 20 ms, since safetensors maps the files and their pages count
as RSS until the loader lets go of them), and the checkpoints' sizes on disk. The 4-bit
loads check that the experts come back packed and that their logits on a fixed input equal
those of the model that saved them. Writes quantized_checkpoint.json and .md to --results.
--profile then loads the 4-bit checkpoint once more (warm, not timed into the table) under
cProfile and writes the top functions to load-profile-nf4-warm.txt beside them, with the
size and read time of /proc/self/maps (P19 reads it for every tensor it releases).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# Targets of issue 14.
LOAD_TIME_RATIO = 1 / 3
HOST_RSS_GIB = 6.0
CHECKPOINT_BYTES = 15e9
STAGES = ("bf16-cold", "nf4-cold", "bf16-warm", "nf4-warm")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")


def fail(message: str) -> None:
    print(f"quantized_checkpoint: {message}", file=sys.stderr)
    sys.exit(2)


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: `5` in clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler(threading.Thread):
    """Peaks of VmRSS, RssAnon and RssFile, read every 20 ms while loading."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = status()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for name, value in status().items():
                self.peaks[name] = max(self.peaks.get(name, 0), value)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peaks


def evict(directory: Path) -> int:
    """Drop the folder's files from the page cache (written back first); returns bytes."""
    total = 0
    for path in directory.iterdir():
        if not path.is_file():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        total += path.stat().st_size
    return total


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def expert_bytes(directory: Path) -> int:
    """Bytes of the experts' tensors (and their quant state) in the folder's safetensors."""
    from safetensors import safe_open

    sizes = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if ".experts." in key:
                    tensor = handle.get_slice(key)
                    count = 1
                    for size in tensor.get_shape():
                        count *= size
                    total += count * sizes[tensor.get_dtype()]
    return total


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# --- one load, in its own process -----------------------------------------------------------


def quantization():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def fixed_logits(model, device: str, vocab: int):
    """Logits of the last 4 positions for a fixed 64-token input, in float32 on the CPU."""
    import torch

    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    model.train()  # Gemma 4 has no dropout; bitsandbytes' CPU eval path repacks weights
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits[:, -4:].float().cpu()


def run_stage(args: argparse.Namespace) -> None:
    import torch
    import transformers
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    device = "cpu" if args.tiny else "cuda:0"
    if not args.tiny:
        torch.zeros(1, device=device)  # the CUDA context belongs to the baseline
    source = args.bf16 if args.stage.startswith("bf16") else args.nf4
    evicted = evict(source) if args.stage.endswith("cold") else 0
    baseline = status()
    hwm_reset = reset_peak_rss()
    sampler = RssSampler()
    sampler.start()
    if not args.tiny:
        torch.cuda.reset_peak_memory_stats()
    extra = {"quantization_config": quantization()} if args.stage.startswith("bf16") else {}
    profiler = cProfile.Profile() if args.profile_to else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map={"": device}, dtype=torch.bfloat16, **extra
    )
    if not args.tiny:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    if profiler:
        profiler.disable()
        write_profile(profiler, args.profile_to, load_s)
    peaks = sampler.stop()
    after = status()
    experts = [m for m in model.modules() if type(m).__name__ == "Gemma4TextExperts"]
    report = {
        "stage": args.stage,
        "transformers_file": transformers.__file__,
        # P19 gives each tensor's file pages back once it is copied: without it the sampled
        # file-backed peak is every page read (47.2 GiB of the BF16 checkpoint on an H200).
        "p19_releases_checkpoint_pages": hasattr(loading, "stackpatch_materialize_releasing"),
        "evicted_bytes": evicted,
        "load_s": round(load_s, 2),
        "baseline_rss_gib": round(baseline["VmRSS"] / GIB, 3),
        "peak_rss_above_baseline_gib": round((after["VmHWM"] - baseline["VmRSS"]) / GIB, 3),
        "peak_rss_is_since_baseline": hwm_reset,
        "sampled_peak_anon_above_baseline_gib": round(
            (peaks["RssAnon"] - baseline["RssAnon"]) / GIB, 3
        ),
        "sampled_peak_file_above_baseline_gib": round(
            (peaks["RssFile"] - baseline["RssFile"]) / GIB, 3
        ),
        "rss_after_load_above_baseline_gib": round((after["VmRSS"] - baseline["VmRSS"]) / GIB, 3),
        "expert_tensor_types": sorted({type(m.gate_up_proj).__name__ for m in experts}),
        "packed_expert_modules": sum(
            bool(getattr(m, "_stackpatch_4bit_experts", False)) for m in experts
        ),
        "expert_modules": len(experts),
        "experts_implementation": experts[0].config._experts_implementation if experts else None,
    }
    if not args.tiny:
        report["gpu_loading_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        report["gpu_resident_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    logits = fixed_logits(model, device, model.config.get_text_config().vocab_size)
    reference = args.work / "bf16-cold-logits.pt"
    if args.stage == "bf16-cold":
        save_checkpoint(model, args, report)
        torch.save(logits, reference)
    elif reference.exists():
        expected = torch.load(reference)
        report["logits_equal_to_saving_model"] = bool(torch.equal(logits, expected))
        report["logits_max_abs_diff"] = float((logits - expected).abs().max())
    print(json.dumps(report), flush=True)


def proc_maps_cost(repeats: int = 50) -> tuple[int, float]:
    """Lines of /proc/self/maps and the milliseconds one read of it takes, now."""
    start = time.perf_counter()
    for _ in range(repeats):
        text = Path("/proc/self/maps").read_text()
    return text.count("\n"), (time.perf_counter() - start) / repeats * 1e3


def write_profile(profiler: cProfile.Profile, path: Path, load_s: float) -> None:
    lines, read_ms = proc_maps_cost()
    out = io.StringIO()
    out.write(f"from_pretrained under cProfile: {load_s:.2f} s\n")
    out.write(f"/proc/self/maps after loading: {lines} lines, {read_ms:.2f} ms per read\n\n")
    for order, count in (("cumulative", 60), ("tottime", 40)):
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(count)
    write_atomically(path, out.getvalue())


def save_checkpoint(model, args: argparse.Namespace, report: dict) -> None:
    """save_pretrained into a .partial folder, renamed over --nf4 once complete."""
    partial = args.nf4.with_name(args.nf4.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    model.save_pretrained(partial)
    for path in partial.iterdir():  # on disk before the rename makes it the checkpoint
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
    report["save_s"] = round(time.perf_counter() - start, 2)
    for path in args.bf16.iterdir():  # tokenizer and chat template, for training runs
        weights = path.name.startswith(WEIGHT_FILES) or path.suffix == ".safetensors"
        if path.is_file() and not weights and not (partial / path.name).exists():
            shutil.copy2(path, partial / path.name)
    shutil.rmtree(args.nf4, ignore_errors=True)
    os.replace(partial, args.nf4)


# --- the driver ----------------------------------------------------------------------------


def make_tiny(directory: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "validation"))
    from tiny_gemma4 import text_config
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(text_config(num_experts=32, moe_intermediate_size=64))
    partial = directory.with_name(directory.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(partial)
    os.replace(partial, directory)


def check_p13() -> str:
    """The transformers this interpreter imports, which must carry P13's checkpoint support."""
    import transformers.integrations.bitsandbytes as integration

    if not hasattr(integration, "stackpatch_experts_weight_conversions"):
        fail(
            f"{integration.__file__} has no P13 checkpoint support: run "
            "`python3 apply_patches.py --apply` first"
        )
    return integration.__file__


def child(args: argparse.Namespace, stage: str, profile_to: Path | None = None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--stage",
        stage,
        "--bf16",
        str(args.bf16),
        "--nf4",
        str(args.nf4),
        "--work",
        str(args.work),
    ] + (["--tiny"] if args.tiny else [])
    command += ["--profile-to", str(profile_to)] if profile_to else []
    print(f"== {stage}" + (" (profiled)" if profile_to else ""), flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode or not lines:
        sys.stderr.write(completed.stderr[-4000:])
        fail(f"{stage} failed (exit {completed.returncode}); its stderr is above")
    report = json.loads(lines[-1])
    print(json.dumps(report), flush=True)
    return report


def versions() -> dict[str, str]:
    import bitsandbytes
    import torch
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    for name in ("peft", "accelerate", "safetensors", "triton"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def device_name(tiny: bool) -> str:
    import torch

    if tiny or not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return torch.cuda.get_device_name(0)


def host_ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / GIB, 1)
    return 0.0


def targets(runs: dict, sizes: dict) -> dict:
    ratio = runs["nf4-cold"]["load_s"] / runs["bf16-cold"]["load_s"]
    return {
        "nf4_load_time_over_bf16_cold": round(ratio, 3),
        "nf4_load_time_over_bf16_warm": round(
            runs["nf4-warm"]["load_s"] / runs["bf16-warm"]["load_s"], 3
        )
        if "nf4-warm" in runs
        else None,
        "load_time_met": ratio <= LOAD_TIME_RATIO,
        "host_rss_met": all(
            runs[s]["peak_rss_above_baseline_gib"] <= HOST_RSS_GIB
            for s in ("bf16-cold", "nf4-cold")
        ),
        "host_anon_rss_met": all(
            runs[s]["sampled_peak_anon_above_baseline_gib"] <= HOST_RSS_GIB
            for s in ("bf16-cold", "nf4-cold")
        ),
        "checkpoint_size_met": sizes["nf4_bytes"] <= CHECKPOINT_BYTES,
        "logits_equal": all(
            runs[s].get("logits_equal_to_saving_model", False) for s in runs if s.startswith("nf4")
        ),
    }


def size(count: int) -> str:
    if count >= GIB / 100:
        return f"{count / GIB:.2f} GiB ({count / 1e9:.2f} GB)"
    return f"{count / 2**20:.2f} MiB"


def markdown(result: dict) -> str:
    meta, runs, sizes, met = result["meta"], result["runs"], result["sizes"], result["targets"]
    stages = [s for s in STAGES if s in runs]
    names = {
        "bf16-cold": "BF16 ckpt → P13 (cold)",
        "nf4-cold": "4-bit ckpt (cold)",
        "bf16-warm": "BF16 ckpt → P13 (warm)",
        "nf4-warm": "4-bit ckpt (warm)",
    }

    def cell(value, unit: str) -> str:
        if value is None:
            return "–"
        if isinstance(value, list):
            return ", ".join(f"`{v}`" for v in value)
        return f"{value}{unit}"

    def row(label: str, key: str, unit: str = "") -> str:
        cells = [cell(runs[s].get(key), unit) for s in stages]
        return f"| {label} | " + " | ".join(cells) + " |"

    v = meta["versions"]
    lines = [
        f"# Gemma 4 {meta['model']}: the 4-bit checkpoint against quantizing on load "
        f"({meta['device']}, {meta['date']})",
        "",
        "`bench/quantized_checkpoint.py`: each load in its own process, `device_map` on one "
        "device, NF4 with double quantization, BF16 compute. *cold*: the checkpoint's files "
        "dropped from the page cache first (`posix_fadvise(DONTNEED)`); *warm*: read again "
        f"from the page cache. Host: {meta['host_ram_gib']} GiB RAM. torch {v['torch']}, "
        f"transformers {v['transformers']} (P13 applied), bitsandbytes {v['bitsandbytes']}, "
        f"peft {v['peft']}, accelerate {v['accelerate']}, safetensors {v['safetensors']}, "
        f"triton {v['triton']}, Python {v['python']}.",
        "",
        "| | " + " | ".join(names[s] for s in stages) + " |",
        "| --- | " + " | ".join("---" for _ in stages) + " |",
        row("load time (from_pretrained)", "load_s", " s"),
        row("GPU peak while loading", "gpu_loading_peak_gib", " GiB"),
        row("GPU resident after loading", "gpu_resident_gib", " GiB"),
        row("host peak RSS above baseline (VmHWM)", "peak_rss_above_baseline_gib", " GiB"),
        row(
            "anonymous RSS above baseline, sampled peak",
            "sampled_peak_anon_above_baseline_gib",
            " GiB",
        ),
        row(
            "file-backed RSS above baseline, sampled peak",
            "sampled_peak_file_above_baseline_gib",
            " GiB",
        ),
        row("host RSS after loading, above baseline", "rss_after_load_above_baseline_gib", " GiB"),
        row("checkpoint pages released as read (P19)", "p19_releases_checkpoint_pages"),
        row("expert tensors", "expert_tensor_types"),
        row("logits equal to the saving model's", "logits_equal_to_saving_model"),
        "",
        f"Checkpoints on disk: BF16 {size(sizes['bf16_bytes'])}, 4-bit "
        f"{size(sizes['nf4_bytes'])}; the experts' tensors {size(sizes['bf16_expert_bytes'])} → "
        f"{size(sizes['nf4_expert_bytes'])} "
        f"({sizes['nf4_expert_bytes'] / sizes['bf16_expert_bytes']:.3f} of BF16). save_pretrained "
        f"of the 4-bit model: {runs['bf16-cold'].get('save_s', '–')} s, into `{meta['nf4_dir']}`, "
        "which training runs can start from (`CKPT=<that folder> LABELS=patched bash "
        "bench/train_example_26b.sh`).",
        "",
        "Targets (issue 14):",
        f"- 4-bit load ≤ 1/3 of the BF16 path's time: cold "
        f"{met['nf4_load_time_over_bf16_cold']}, warm "
        f"{met['nf4_load_time_over_bf16_warm'] or 'not measured'} → "
        f"{'met' if met['load_time_met'] else 'NOT met'} (cold);",
        f"- both loads ≤ {HOST_RSS_GIB:g} GiB host RSS above baseline: VmHWM "
        f"{'met' if met['host_rss_met'] else 'NOT met'}, anonymous memory "
        f"{'met' if met['host_anon_rss_met'] else 'NOT met'};",
        f"- 4-bit checkpoint ≤ 15 GB: {'met' if met['checkpoint_size_met'] else 'NOT met'}.",
        "",
        f"Reloaded 4-bit models give the saving model's logits: {met['logits_equal']}. Raw "
        "numbers: `quantized_checkpoint.json`.",
    ]
    return "\n".join(lines) + "\n"


def drive(args: argparse.Namespace) -> None:
    transformers_file = check_p13()
    if not (args.bf16 / "config.json").exists():
        print(f"== make {args.bf16}", flush=True)
        if args.tiny:
            make_tiny(args.bf16)
        else:
            script = ROOT / "bench" / "whole_model_memory.py"
            subprocess.run(
                [sys.executable, str(script), "make", "--dir", str(args.bf16)], check=True
            )
    bf16_bytes = disk_bytes(args.bf16)
    free = shutil.disk_usage(args.nf4.parent if args.nf4.parent.exists() else Path("/")).free
    existing = disk_bytes(args.nf4) if args.nf4.exists() else 0
    if free + existing < 0.35 * bf16_bytes:
        fail(
            f"{args.nf4.parent} has {free / GIB:.1f} GiB free, the 4-bit checkpoint needs about "
            f"{0.3 * bf16_bytes / GIB:.1f} GiB: pass --nf4 on a larger disk"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "bf16-cold-logits.pt").unlink(missing_ok=True)
    stages = STAGES if args.warm else STAGES[:2]
    runs = {stage: child(args, stage) for stage in stages}
    sizes = {
        "bf16_bytes": bf16_bytes,
        "nf4_bytes": disk_bytes(args.nf4),
        "bf16_expert_bytes": expert_bytes(args.bf16),
        "nf4_expert_bytes": expert_bytes(args.nf4),
    }
    meta = {
        "date": date.today().isoformat(),
        "device": device_name(args.tiny),
        "model": "tiny test model" if args.tiny else "26B-A4B text model (random weights)",
        "host_ram_gib": host_ram_gib(),
        "versions": versions(),
        "transformers_file": transformers_file,
        "bf16_dir": str(args.bf16),
        "nf4_dir": str(args.nf4),
    }
    result = {"meta": meta, "runs": runs, "sizes": sizes}
    result["targets"] = targets(runs, sizes)
    args.results.mkdir(parents=True, exist_ok=True)
    write_atomically(
        args.results / "quantized_checkpoint.json", json.dumps(result, indent=2) + "\n"
    )
    text = markdown(result)
    write_atomically(args.results / "quantized_checkpoint.md", text)
    print(text)
    if args.profile:
        child(args, "nf4-warm", args.results / "load-profile-nf4-warm.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", type=Path, default=Path("/tmp/ckpt-26b"), help="BF16 checkpoint")
    parser.add_argument(
        "--nf4", type=Path, default=Path("/tmp/ckpt-26b-nf4"), help="where the 4-bit one goes"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantized-checkpoint-work"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke run)")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="cold loads only")
    parser.add_argument(
        "--profile", action="store_true", help="then profile one more warm 4-bit load (cProfile)"
    )
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
