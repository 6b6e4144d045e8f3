"""The measurement layer every trainer process of the peers benchmark shares.

One process = one trainer and one LoRA row, loaded once, trained at every requested length.
Each process calls `Process.start()` first: that caps the GPU at `PEERS_CAP_GIB` with
`torch.cuda.set_per_process_memory_fraction` before anything is loaded, and every result
line it writes carries the same fields, measured the same way:

- per-step wall times, each ended by `torch.cuda.synchronize()`, step end to step end, so a
  step's time holds everything the loop does between two optimizer steps;
- tokens/s = the median over steps >= 3 of (tokens in the step / its wall time);
- peak GPU memory allocated and reserved (`torch.cuda.max_memory_*`, reset per length);
- load time, host peak RSS (VmHWM), the first losses, and on failure the exception's exact
  text (an out-of-memory error under the cap is a result, not a crash).

Lines go to the JSONL named by `PEERS_RESULTS` as soon as they exist (one `write` on an
O_APPEND descriptor, then fsync), so a run killed at the device's time limit keeps what it
finished. This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

GIB = 2**30
DEFAULT_CAP_GIB = 23.0
FIRST_TIMED_STEP = 3  # steps 1-2 warm up (allocator, autotuning, compilation) and are left out
FIRST_LOSSES = 5
VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "unsloth",
    "unsloth_zoo",
    "trl",
    "datasets",
    "experts4bit-qlora",
    "grouped-nf4-gemm",
    "axolotl",
)


class DeadlineReached(BaseException):
    """Raised inside a trainer process when run.sh's timeout sends SIGTERM.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows
    it: the adapter must write what it has and end."""


def cap_fraction(cap_gib: float, total_bytes: int) -> float:
    """The fraction of the device's memory that `cap_gib` GiB is (what torch's cap takes)."""
    if cap_gib <= 0 or total_bytes <= 0:
        raise ValueError(f"cap {cap_gib} GiB of {total_bytes} bytes: both must be positive")
    return min(1.0, cap_gib * GIB / total_bytes)


def vm_hwm_gib(status_text: str) -> float | None:
    """Peak resident set size (VmHWM) from the text of /proc/self/status, in GiB."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmHWM in unexpected unit {unit!r}")
            return round(int(value) * 1024 / GIB, 3)
    return None


def host_peak_rss_gib() -> float | None:
    try:
        return vm_hwm_gib(Path("/proc/self/status").read_text())
    except OSError:
        return None


def median_tokens_per_s(
    step_seconds: Sequence[float], step_tokens: Sequence[int], first: int = FIRST_TIMED_STEP
) -> float | None:
    """Median over steps >= `first` (1-based) of tokens/seconds; None when no such step ran."""
    if len(step_seconds) != len(step_tokens):
        raise ValueError("one token count per step")
    rates = [
        tokens / seconds
        for seconds, tokens in zip(step_seconds[first - 1 :], step_tokens[first - 1 :], strict=True)
        if seconds > 0
    ]
    return round(statistics.median(rates), 1) if rates else None


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or "out of memory" in text.lower()


def describe_error(exc: BaseException) -> dict[str, Any]:
    """The exception as a result: its type, exact message and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:]]
    return {
        "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "error": str(exc) or repr(exc),
        "error_where": where,
        "oom": is_out_of_memory(exc),
    }


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a results file; a torn line (killed mid-write) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StepClock:
    """Wall time per optimizer step, from one step's end to the next (synchronized)."""

    sync: Any = None  # torch.cuda.synchronize, or None on CPU
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    _last: float | None = None

    def start(self) -> None:
        if self.sync:
            self.sync()
        self._last = time.perf_counter()

    def step_end(self, tokens: int, loss: float | None = None) -> None:
        if self._last is None:
            raise RuntimeError("StepClock.start() was not called")
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self.tokens.append(int(tokens))
        if loss is not None:
            self.losses.append(float(loss))
        self._last = now

    def summary(self) -> dict[str, Any]:
        return {
            "steps": len(self.seconds),
            "step_s": [round(s, 4) for s in self.seconds],
            "step_tokens": self.tokens,
            "tokens_per_s": median_tokens_per_s(self.seconds, self.tokens),
            "losses": [round(x, 4) for x in self.losses[:FIRST_LOSSES]],
            "last_loss": round(self.losses[-1], 4) if self.losses else None,
            "finite_losses": all(math.isfinite(x) for x in self.losses),
        }


class Process:
    """One trainer process: the cap, the results file and the fields every line carries."""

    def __init__(self, trainer: str, row: str, settings: dict[str, Any]) -> None:
        self.trainer = trainer
        self.row = row
        self.settings = settings
        self.results = Path(os.environ.get("PEERS_RESULTS", "peers.jsonl"))
        self.cap_gib = float(os.environ.get("PEERS_CAP_GIB", DEFAULT_CAP_GIB))
        self.load_s: float | None = None
        self.cuda = False
        self.facts: dict[str, Any] = {}

    # -- lines ---------------------------------------------------------------------------------
    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {
            "kind": kind,
            "trainer": self.trainer,
            "row": self.row,
            "time": now_iso(),
            "pid": os.getpid(),
            "host_peak_rss_gib": host_peak_rss_gib(),
            **fields,
        }
        append_line(self.results, record)
        print(f"[peers] {summary_line(record)}", flush=True)
        return record

    # -- process life ----------------------------------------------------------------------------
    def start(self) -> None:
        """Cap the GPU before anything is loaded; say so in a `start` line."""
        install_deadline_handler()
        import torch

        self.cuda = torch.cuda.is_available()
        cap: dict[str, Any] = {"cap_gib": self.cap_gib}
        if self.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = cap_fraction(self.cap_gib, total)
            torch.cuda.set_per_process_memory_fraction(fraction, 0)
            cap.update(
                device=torch.cuda.get_device_name(0),
                device_total_gib=round(total / GIB, 2),
                cap_fraction=round(fraction, 6),
            )
        else:
            cap.update(device=f"cpu ({platform.machine()})", cap_fraction=None)
        self.facts = {
            **cap,
            "python": platform.python_version(),
            "versions": versions(),
            "settings": self.settings,
            "argv": sys.argv,
        }
        self.write("start", **self.facts)

    def loaded(self, load_s: float, **fields: Any) -> None:
        self.load_s = round(load_s, 2)
        self.write("loaded", load_s=self.load_s, **self.gpu_memory(), **fields)

    def reset_peaks(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def gpu_memory(self) -> dict[str, Any]:
        if not self.cuda:
            return {}
        import torch

        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        }

    def clock(self) -> StepClock:
        if self.cuda:
            import torch

            return StepClock(sync=torch.cuda.synchronize)
        return StepClock()

    def length_result(
        self,
        length: int,
        clock: StepClock,
        error: BaseException | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The line for one length: ok, or what failed and after how many steps."""
        status = "ok"
        details: dict[str, Any] = {}
        if isinstance(error, DeadlineReached):
            status = "timeout"
            details = {"error": "run.sh's per-process time limit (SIGTERM) before all steps ran"}
        elif error is not None:
            details = describe_error(error)
            status = "oom" if details["oom"] else "error"
        return self.write(
            "length",
            length=length,
            status=status,
            load_s=self.load_s,
            cap_gib=self.cap_gib,
            **clock.summary(),
            **self.gpu_memory(),
            **details,
            **fields,
        )

    def failed(self, stage: str, error: BaseException) -> None:
        status = "timeout" if isinstance(error, DeadlineReached) else "error"
        details = describe_error(error)
        if details["oom"]:
            status = "oom"
        self.write("failed", stage=stage, status=status, **self.gpu_memory(), **details)
        traceback.print_exception(error)


def summary_line(record: dict[str, Any]) -> str:
    """One short line per result for the console (the JSONL has everything)."""
    who = f"{record.get('trainer')}/{record.get('row')}"
    kind = record.get("kind")
    if kind == "start":
        return f"{who} start: {record.get('device')}, cap {record.get('cap_gib')} GiB"
    if kind == "loaded":
        return (
            f"{who} loaded in {record.get('load_s')} s, {record.get('allocated_gib')} GiB "
            f"allocated (peak {record.get('peak_allocated_gib')}), "
            f"{record.get('trainable_params')} trainable"
        )
    if kind == "length":
        text = (
            f"{who} {record.get('length')} tokens: {record.get('status')}, "
            f"{record.get('tokens_per_s')} tokens/s over {record.get('steps')} steps, peak "
            f"{record.get('peak_allocated_gib')} / {record.get('peak_reserved_gib')} GiB "
            f"allocated / reserved, losses {record.get('losses', [])[:3]}"
        )
        if record.get("error"):
            kind = f"{record['error_type']}: " if record.get("error_type") else ""
            text += f"; {kind}{str(record['error'])[:400]}"
        return text
    if kind == "failed":
        return (
            f"{who} failed at {record.get('stage')} ({record.get('status')}): "
            f"{record.get('error_type')}: {str(record.get('error'))[:600]}"
        )
    return f"{who} {kind}"


def install_deadline_handler() -> None:
    """SIGTERM (run.sh's `timeout`) raises DeadlineReached in the main thread."""
    signal.signal(signal.SIGTERM, _raise_deadline)


def _raise_deadline(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM ends the process for real
    raise DeadlineReached("SIGTERM")


def parse_lengths(text: str) -> list[int]:
    """'512 2048,4096' -> [512, 2048, 4096]; one clear error for anything else."""
    lengths = []
    for part in text.replace(",", " ").split():
        if not part.isdigit() or int(part) < 2:
            raise ValueError(f"lengths: {part!r} is not a whole number >= 2")
        lengths.append(int(part))
    if not lengths:
        raise ValueError("lengths: none given")
    return lengths


def exit_record(argv: Sequence[str]) -> int:
    """`measure.py exit RESULTS TRAINER ROW RC LOG`: run.sh's line for a process that ended
    without its own final line (killed, crashed in C code, or failed before `start`)."""
    results, trainer, row, rc, log = argv
    tail = ""
    try:
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-15:])
    except OSError as exc:
        tail = f"(no log: {exc})"
    seen = [r for r in read_lines(Path(results)) if r.get("trainer") == trainer]
    append_line(
        Path(results),
        {
            "kind": "exit",
            "trainer": trainer,
            "row": row,
            "rc": int(rc),
            "time": now_iso(),
            "had_start_line": any(r.get("row") == row and r["kind"] == "start" for r in seen),
            "log_tail": tail,
        },
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "exit":
        sys.exit(exit_record(sys.argv[2:]))
    print("usage: measure.py exit RESULTS TRAINER ROW RC LOG", file=sys.stderr)
    sys.exit(2)
