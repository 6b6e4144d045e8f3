"""Wall time of `--verify -q`, `--verify` and `--check` on the real oldest stack, patched.

    python bench/cli_timing.py [--runs 15] [--baseline OTHER_CHECKOUT] [--out FILE]

Builds a venv layered over the cached oldest stack (tests/conftest.py: layered_env, so the
cache itself is never patched: the venv owns copies of transformers, peft and bitsandbytes),
applies every recommended patch with `--apply`, then runs each command `--runs` times with
that venv's interpreter, interleaved with a bare `python -c pass` so that a busy machine
slows all of them alike. Reports the median and fastest wall time of each, the ratio of the
medians to `python -c pass`, and from `python -X importtime` what each command's imports cost.
`--baseline` times `--verify -q` of another checkout of stackpatch too (e.g. the commit
before the quick verify), on the same venv in the same loop.
A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import STACKS, layered_env  # noqa: E402  (after the path is set)

from patches.store import atomic_write  # noqa: E402

CLI = str(ROOT / "apply_patches.py")
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "--verify -q": [CLI, "--verify", "-q"],
    "--verify": [CLI, "--verify"],
    "--check": [CLI, "--check"],
}
UNPATCHED = {"--check": [CLI, "--check"], "--verify -q": [CLI, "--verify", "-q"]}
TARGETS = {"--verify -q": 0.3, "--check": 2.0}


def timed(python: Path, argv: list[str], expect: int = 0) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run, which must exit `expect`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run([str(python), *argv], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != expect:
        raise SystemExit(f"{argv}: exit {completed.returncode}: {completed.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


def import_profile(python: Path, argv: list[str], top: int) -> tuple[float, list[tuple[str, int]]]:
    """Seconds spent importing, and the `top` costliest imports the command made itself
    (the outermost ones, with what they imported in turn)."""
    completed = subprocess.run(
        [str(python), "-X", "importtime", *argv], capture_output=True, text=True, cwd=ROOT
    )
    total_us, outer = 0, []
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        if not self_us.strip().isdigit():
            continue  # the header line
        total_us += int(self_us)
        if len(name) - len(name.lstrip()) == 1:  # nested imports are indented further
            outer.append((name.strip(), int(cumulative_us)))
    outer.sort(key=lambda item: -item[1])
    return total_us / 1e6, outer[:top]


def versions(python: Path) -> str:
    script = (
        "import importlib.metadata as m, sys\n"
        "names = ['torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'libcst', "
        "'rich', 'packaging']\n"
        "print(f'python {sys.version.split()[0]}; ' + ', '.join(f'{n} {m.version(n)}' "
        "for n in names))"
    )
    return subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()


def device() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{model}, {os.cpu_count()} cores"


def commit(checkout: Path = ROOT) -> str:
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=checkout
    )
    return described.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cli_timing.md")
    parser.add_argument("--baseline", type=Path, help="another checkout: time its --verify -q")
    args = parser.parse_args()
    commands = dict(COMMANDS)
    if args.baseline:
        baseline = f"--verify -q of {commit(args.baseline)}"
        commands[baseline] = [str(args.baseline / "apply_patches.py"), "--verify", "-q"]

    with tempfile.TemporaryDirectory(prefix="stackpatch-cli-timing-") as scratch:
        python = layered_env("oldest", Path(scratch) / "venv")
        load_before = os.getloadavg()
        # For comparison, before --apply: every patch pending, so --check parses the targets
        # and --verify -q, finding nothing recorded, hands over to the full engine.
        unpatched = {f"{name}, before --apply": argv for name, argv in UNPATCHED.items()}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in unpatched}
        for name, argv in unpatched.items():
            timed(python, argv, expect=1 if "verify" in name else 0)  # warm the caches
        for _ in range(max(3, args.runs // 3)):
            for name, argv in unpatched.items():
                times[name].append(timed(python, argv, expect=1 if "verify" in name else 0))
        timed(python, [CLI, "--apply", "-q"])
        for argv in commands.values():  # warm the page cache and the bytecode caches
            timed(python, argv)
        times.update({name: [] for name in commands})
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(timed(python, argv))
        load_after = os.getloadavg()
        profiles = {name: import_profile(python, argv, 6) for name, argv in commands.items()}
        stack = versions(python)

    bare = statistics.median(wall for wall, _ in times["python -c pass"])
    rows = [
        "| command | wall s, median | wall s, fastest | median / `python -c pass` | target "
        "| CPU s, median | imports s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in [*commands, *(f"{command}, before --apply" for command in UNPATCHED)]:
        samples = times[name]
        walls = [wall for wall, _ in samples]
        median = statistics.median(walls)
        target = f"≤ {TARGETS[name]} s" if name in TARGETS else "-"
        cpu_median = statistics.median(cpu for _, cpu in samples)
        imported = f"{profiles[name][0]:.3f}" if name in profiles else "-"
        rows.append(
            f"| `{name}` | {median:.3f} | {min(walls):.3f} | {median / bare:.1f}× | {target} "
            f"| {cpu_median:.3f} | {imported} |"
        )
    lines = [
        "# CLI wall time on the real oldest stack, every recommended patch applied",
        "",
        "Two more rows for comparison: the same venv before `--apply` (every patch pending: "
        "`--check` parses the targets, `--verify -q` finds nothing recorded and hands over to "
        "the full engine).",
        "",
        f"Generated by `python bench/cli_timing.py --runs {args.runs}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
        f"{commit()}.",
        "",
        f"- device: {device()}; load average {load_before[0]:.2f} before the runs, "
        f"{load_after[0]:.2f} after",
        f"- stack (`{' '.join(STACKS['oldest'])}`, a venv layered over the cached one): {stack}",
        f"- each command {args.runs} times, interleaved, with the venv's interpreter (the two "
        "before --apply: before it, fewer times); CPU s is "
        "user + system time (less sensitive than wall time to other work on the machine); "
        "`imports s` is the sum of `python -X importtime`'s self times in one more run",
        "",
        *rows,
        "",
        "What each command imports at its top level, costliest first (`-X importtime`, "
        "cumulative ms):",
        "",
    ]
    for name, (_, outer) in profiles.items():
        shown = ", ".join(f"{module} {us / 1000:.0f}" for module, us in outer)
        lines.append(f"- `{name}`: {shown}")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
