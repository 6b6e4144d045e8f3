"""Turn the peers benchmark's JSONL into bench/results/peers.md and peers.json.

    python bench/peers/report.py --results OUT1/peers.jsonl [OUT2/peers.jsonl ...] \
        --md bench/results/peers.md --json bench/results/peers.json
    python bench/peers/report.py --results OUT/peers.jsonl --print   # compact table

Several files (one per device call) merge. Per trainer, row and length the latest attempt
(process) that reached that length counts (else the latest that asked for it); everything
else it tried is listed under "Attempts". Ratios
are against the fastest peer (every trainer but stackpatch) at the same length and row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import read_lines, write_atomic

OURS = "stackpatch"
TRAINER_ORDER = ("stackpatch", "unsloth", "experts4bit-qlora", "axolotl")
ROW_TITLES = {
    "attn": "LoRA r16 α16 on q/k/v/o",
    "experts": "LoRA r16 α16 on q/k/v/o + the experts",
}
LOADED_FIELDS = (
    "load_s",
    "allocated_gib",
    "peak_allocated_gib",
    "trainable_params",
    "weights",
    "expert_modules",
)
REPACKING = (
    "Two wheels are repacked by `bench/peers/wheels.py` so that the set fits the device's carry "
    "limit: only files that the peer's import and training path never load are removed "
    "(unsloth's `studio/` web app; bitsandbytes' native libraries for CUDA versions other than "
    "the machine's 13.0, for ROCm and for Intel XPU) and RECORD is regenerated; every other file "
    "keeps its bytes. The script downloads the official wheels, checks their sha256 (below), "
    "repacks reproducibly and prints both hashes; run.sh checks each file it installs against "
    "that manifest."
)
TARGET_LENGTH = 2048
TARGET_RATIO = 1.5


@dataclass
class Attempt:
    trainer: str
    row: str
    pid: Any
    records: list[dict[str, Any]] = field(default_factory=list)

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r["kind"] == kind), None)

    @property
    def lengths(self) -> dict[int, dict[str, Any]]:
        return {r["length"]: r for r in self.records if r["kind"] == "length"}

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] in ("failed", "unavailable")]

    @property
    def exit_code(self) -> int | None:
        codes = [r["rc"] for r in self.records if r["kind"] == "exit"]
        return codes[-1] if codes else None

    @property
    def time(self) -> str:
        return self.records[0].get("time", "")


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        records.extend(read_lines(path))
    return sorted(records, key=lambda r: r.get("time", ""))


def attempts(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[Attempt]]:
    """Records grouped into processes per (trainer, row), in time order.

    A process's lines share its pid; run.sh's `exit` line (no pid) closes the latest open
    attempt of its trainer and row; a line without pid and without an open attempt (a
    process that never started, axolotl's check) is an attempt of its own."""
    grouped: dict[tuple[str, str], list[Attempt]] = {}
    for record in records:
        if record.get("kind") == "setup":
            continue
        key = (record["trainer"], record["row"])
        runs = grouped.setdefault(key, [])
        pid = record.get("pid")
        if record["kind"] == "exit":
            open_runs = [a for a in runs if a.exit_code is None and a.pid is not None]
            if open_runs:
                open_runs[-1].records.append(record)
                continue
        elif pid is not None and runs and runs[-1].pid == pid:
            runs[-1].records.append(record)
            continue
        runs.append(Attempt(record["trainer"], record["row"], pid, [record]))
    return grouped


def chosen(runs: Sequence[Attempt]) -> Attempt:
    """The latest attempt that reached a length, else the latest attempt."""
    reached = [a for a in runs if a.lengths]
    return (reached or list(runs))[-1]


def chosen_for(runs: Sequence[Attempt], length: int) -> Attempt:
    """The latest attempt that reached `length`; if none did, `chosen(runs)` where it asked
    for that length, else the latest attempt that asked. A later call that measured another
    length does not hide this one's result."""
    reached = [a for a in runs if length in a.lengths]
    if reached:
        return reached[-1]
    fallback = chosen(runs)
    asked = [a for a in runs if length in requested_lengths(a)]
    return fallback if not asked or fallback in asked else asked[-1]


def gib(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"


def describe_outcome(attempt: Attempt, length: int) -> tuple[str, dict[str, Any] | None]:
    result = attempt.lengths.get(length)
    if result is not None:
        return result["status"], result
    failures = attempt.failures
    if failures:
        last = failures[-1]
        return f"{last.get('status', 'error')} at {last.get('stage', 'check')}", None
    code = attempt.exit_code
    if code is not None and code != 0:
        cause = "time limit" if code in (124, 137, 143) else f"exit {code}"
        return f"not reached ({cause})", None
    return "not reached", None


def table(grouped: dict[tuple[str, str], list[Attempt]], row: str) -> list[dict[str, Any]]:
    """One entry per trainer and length of `row`, with ratios to the fastest peer."""
    runs_of = {t: runs for (t, r), runs in grouped.items() if r == row}
    asked = {t: {n for a in runs for n in requested_lengths(a)} for t, runs in runs_of.items()}
    every = sorted(set().union(*asked.values())) if asked else []
    # a process that stopped before naming its lengths (a check, a failed import) gets a row
    # for each length the others ran
    lengths_of = {t: sorted(mine) or every for t, mine in asked.items()}
    picked = {(t, n): chosen_for(runs, n) for t, runs in runs_of.items() for n in lengths_of[t]}
    fastest: dict[int, tuple[str, float]] = {}
    for (t, length), a in picked.items():
        result = a.lengths.get(length)
        if t == OURS or not result or result["status"] != "ok" or not result.get("tokens_per_s"):
            continue
        if length not in fastest or result["tokens_per_s"] > fastest[length][1]:
            fastest[length] = (t, result["tokens_per_s"])
    entries = []
    for trainer in sorted(runs_of, key=trainer_rank):
        for length in lengths_of[trainer]:
            attempt = picked[trainer, length]
            loaded = attempt.first("loaded") or {}
            status, result = describe_outcome(attempt, length)
            # a partial median counts for a run cut off by the time limit, not for a failure
            rate = result.get("tokens_per_s") if result and status in ("ok", "timeout") else None
            if status == "timeout" and result:
                status = f"timeout after {result.get('steps')} steps"
            best = fastest.get(length)
            entries.append(
                {
                    "trainer": trainer,
                    "version": trainer_version(attempt),
                    "length": length,
                    "status": status,
                    "tokens_per_s": rate,
                    "vs_fastest_peer": round(rate / best[1], 2) if rate and best else None,
                    "fastest_peer": best[0] if best else None,
                    "peak_allocated_gib": result.get("peak_allocated_gib") if result else None,
                    "peak_reserved_gib": result.get("peak_reserved_gib") if result else None,
                    "load_s": loaded.get("load_s"),
                    "host_peak_rss_gib": (result or {}).get("host_peak_rss_gib"),
                    "steps": result.get("steps") if result else None,
                    # compile and autotune warm-up lands in the first steps, which the
                    # median leaves out: shown beside it
                    "first_steps_s": (result.get("step_s") or [])[:2] if result else [],
                    "steps_wall_s": round(sum(result["step_s"]), 1)
                    if result and result.get("step_s")
                    else None,
                    "losses": result.get("losses", []) if result else [],
                    "trainable_params": loaded.get("trainable_params"),
                    "error": (result or {}).get("error")
                    or next((f.get("error") for f in attempt.failures), None),
                }
            )
    return entries


def requested_lengths(attempt: Attempt) -> list[int]:
    start = attempt.first("start") or {}
    lengths = (start.get("settings") or {}).get("lengths")
    return list(lengths) if lengths else sorted(attempt.lengths)


def trainer_rank(trainer: str) -> int:
    return TRAINER_ORDER.index(trainer) if trainer in TRAINER_ORDER else len(TRAINER_ORDER)


def trainer_version(attempt: Attempt) -> str | None:
    start = attempt.first("start") or {}
    names = {"unsloth": "unsloth", "experts4bit-qlora": "experts4bit-qlora", OURS: "transformers"}
    name = names.get(attempt.trainer)
    version = (start.get("versions") or {}).get(name) if name else None
    if attempt.trainer == OURS and version:
        return f"example on patched transformers {version}"
    return version


def targets(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's targets against one row's table, in words."""
    notes = []
    ours = {e["length"]: e for e in entries if e["trainer"] == OURS}
    peers = [e for e in entries if e["trainer"] != OURS and e["status"] == "ok"]
    at_target = ours.get(TARGET_LENGTH)
    peer_rates = [e for e in peers if e["length"] == TARGET_LENGTH and e["tokens_per_s"]]
    if at_target and at_target["status"] == "ok" and peer_rates:
        best = max(peer_rates, key=lambda e: e["tokens_per_s"])
        ratio = at_target["tokens_per_s"] / best["tokens_per_s"]
        verdict = "met" if ratio >= TARGET_RATIO else "not met"
        notes.append(
            f"speed at {TARGET_LENGTH} tokens: {ratio:.2f}× the fastest peer ({best['trainer']}, "
            f"{best['tokens_per_s']:.0f} tokens/s); target ≥ {TARGET_RATIO}× — {verdict}"
        )
        lean = [e for e in peer_rates if e["peak_allocated_gib"] is not None]
        if lean and at_target["peak_allocated_gib"] is not None:
            leanest = min(lean, key=lambda e: e["peak_allocated_gib"])
            fits = at_target["peak_allocated_gib"] <= leanest["peak_allocated_gib"]
            notes.append(
                f"peak memory at {TARGET_LENGTH} tokens: {at_target['peak_allocated_gib']:.2f} GiB "
                f"against the leanest peer's {leanest['peak_allocated_gib']:.2f} GiB "
                f"({leanest['trainer']}) — {'met' if fits else 'not met'}"
            )
    elif peer_rates:
        notes.append(f"speed at {TARGET_LENGTH} tokens: stackpatch has no result — not met")
    else:
        notes.append(f"speed at {TARGET_LENGTH} tokens: no peer has a result to compare with")
    peer_lengths = sorted({e["length"] for e in peers})
    missing = [n for n in peer_lengths if (ours.get(n) or {}).get("status") != "ok"]
    if peer_lengths:
        notes.append(
            "every length a peer fits under the cap fits for stackpatch — "
            + ("met" if not missing else f"not met at {', '.join(map(str, missing))} tokens")
        )
    return notes


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    setups = [r for r in records if r.get("kind") == "setup"]
    grouped = attempts(records)
    rows = [row for row in ROW_TITLES if any(r == row for _, r in grouped)]
    tables = {row: table(grouped, row) for row in rows}
    starts = [r for r in records if r.get("kind") == "start"]
    return {
        "dates": sorted({r["time"][:10] for r in records if r.get("time")}),
        "gpu": sorted({s["gpu"] for s in setups if s.get("gpu")}),
        "devices": sorted({s["device"] for s in starts if s.get("device")}),
        "cap_gib": sorted({s["cap_gib"] for s in starts if s.get("cap_gib") is not None}),
        "machine_versions": setups[-1]["machine_versions"] if setups else {},
        "wheels": setups[-1]["wheels"] if setups else [],
        "settings": {f"{s['trainer']}/{s['row']}": s.get("settings") for s in starts},
        "loaded": [
            {
                "trainer": a.trainer,
                "row": a.row,
                **{k: loaded.get(k) for k in LOADED_FIELDS},
            }
            for runs in grouped.values()
            for a in [chosen(runs)]
            for loaded in [a.first("loaded")]
            if loaded
        ],
        "tables": tables,
        "targets": {row: targets(entries) for row, entries in tables.items()},
        "attempts": [
            {
                "trainer": a.trainer,
                "row": a.row,
                "time": a.time,
                "lengths": sorted(a.lengths),
                "exit": a.exit_code,
                "log_tail": next(
                    (
                        r.get("log_tail")
                        for r in a.records
                        if r["kind"] == "exit" and r.get("rc") and not a.first("start")
                    ),
                    None,
                ),
                "failures": [
                    {k: f.get(k) for k in ("stage", "status", "error_type", "error", "error_where")}
                    for f in a.failures
                ],
            }
            for runs in grouped.values()
            for a in runs
        ],
    }


def cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Side by side: stackpatch, unsloth, experts4bit-qlora, axolotl (issue 13)",
        "",
        f"Date: {', '.join(report['dates']) or '–'}. GPU: {'; '.join(report['gpu']) or '–'}. "
        f"Cap: `torch.cuda.set_per_process_memory_fraction` = "
        f"{', '.join(str(c) for c in report['cap_gib']) or '–'} GiB in every "
        "trainer process, set before loading. Made by `bench/peers/run.sh` and "
        "`bench/peers/report.py` from the run's JSONL.",
        "",
        "Machine stack (peers run on it after `apply_patches.py --revert`; stackpatch's row on "
        "it patched): "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["machine_versions"].items())),
        "",
        "Same for every trainer: the random-weight 26B-A4B checkpoint of "
        "`bench/whole_model_memory.py make`, the chat data of `bench/example_data.py` tokenized "
        "once by `bench/peers/tokens.py` (the example's chat template and assistant-only labels; "
        "the stackpatch adapter checks the example's own rows are identical), row k at step k, "
        "batch 1, NF4 with BF16 compute, LoRA r16 α16 dropout 0, gradient checkpointing, "
        "learning rate 2e-4 with cosine schedule and 3% warm-up, gradient clipping 1.0, a fresh "
        "adapter and optimizer per length. tokens/s = median over steps ≥ 3 of tokens / step "
        "wall time (synchronized, step end to step end); peaks = `torch.cuda.max_memory_*` "
        "over the length's training (reset after loading); host RSS = VmHWM of the process. "
        "steps 1, 2 s: the first two steps' wall time, where compile and autotune warm-up "
        "land; all steps s: the wall time of every step of the length, warm-up included.",
        "",
    ]
    for row, entries in report["tables"].items():
        lines += [
            f"## {ROW_TITLES[row]}",
            "",
            "| trainer | tokens | status | tokens/s | × fastest peer | peak allocated GiB "
            "| peak reserved GiB | load s | steps 1, 2 s | all steps s | host peak RSS GiB "
            "| first losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in entries:
            ratio = f"{e['vs_fastest_peer']:.2f}" if e["vs_fastest_peer"] is not None else "–"
            losses = ", ".join(f"{x:.3f}" for x in e["losses"][:3]) or "–"
            first = ", ".join(f"{x:.1f}" for x in e.get("first_steps_s", [])) or "–"
            lines.append(
                f"| {e['trainer']} | {e['length']:,} | {e['status']} | "
                f"{cell(e['tokens_per_s'])} | {ratio} | {gib(e['peak_allocated_gib'])} | "
                f"{gib(e['peak_reserved_gib'])} | {cell(e['load_s'], 1)} | {first} | "
                f"{cell(e.get('steps_wall_s'), 1)} | {gib(e['host_peak_rss_gib'])} | {losses} |"
            )
        lines += ["", "Targets (issue 13):", ""]
        lines += [f"- {note}" for note in report["targets"][row]]
        lines.append("")
    lines += [
        "## After loading",
        "",
        "| trainer/row | load s | allocated GiB | loading peak GiB | trainable parameters "
        "| tensors by kind (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for item in sorted(report["loaded"], key=lambda i: (trainer_rank(i["trainer"]), i["row"])):
        kinds = "; ".join(
            f"{kind} {value['gib']:.2f}" for kind, value in (item.get("weights") or {}).items()
        )
        lines.append(
            f"| {item['trainer']}/{item['row']} | {cell(item['load_s'], 1)} | "
            f"{gib(item['allocated_gib'])} | {gib(item['peak_allocated_gib'])} | "
            f"{cell(item['trainable_params'])} | {kinds or '–'} |"
        )
    lines += ["", "## Settings per process", ""]
    for key, settings in sorted(report["settings"].items()):
        lines.append(f"- `{key}`: {json.dumps(settings, sort_keys=True)}")
    lines += ["", "## Failures and attempts (exact errors)", ""]
    for a in report["attempts"]:
        head = (
            f"- {a['trainer']}/{a['row']} at {a['time']}: lengths reached "
            f"{a['lengths'] or 'none'}, exit {a['exit']}"
        )
        lines.append(head)
        if a.get("log_tail"):
            lines.append(f"  - died before its first line; log tail: `{a['log_tail'][-400:]}`")
        for f in a["failures"]:
            where = " ← ".join(reversed(f.get("error_where") or []))
            kind = f"`{f['error_type']}`: " if f.get("error_type") else ""
            lines.append(
                f"  - {f.get('stage') or 'check'} ({f.get('status')}): {kind}{f.get('error')}"
                + (f" (at {where})" if where else "")
            )
    for row, entries in report["tables"].items():
        previous = None
        for e in entries:
            if e["status"] in ("oom", "error") and e["error"]:
                same = previous == (e["trainer"], e["error"])
                previous = (e["trainer"], e["error"])
                text = "the same" if same else e["error"]
                lines.append(f"- {e['trainer']}/{row} at {e['length']} tokens: {text}")
    lines += ["", "## Wheels carried (bench/peers/wheels.py)", "", REPACKING, ""]
    lines += [
        "| wheel | MB | sha256 | official sha256 (if repacked) | removed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in report["wheels"]:
        lines.append(
            f"| {w['file']} | {w['bytes'] / 1e6:.2f} | `{w['sha256']}` | "
            f"{'`' + w['official_sha256'] + '`' if w['repacked'] else 'official'} | "
            f"{', '.join(w['removed']) or '–'} |"
        )
    return "\n".join(lines) + "\n"


def console(report: dict[str, Any]) -> str:
    lines = []
    for row, entries in report["tables"].items():
        lines.append(f"== {ROW_TITLES[row]}")
        shown: set[tuple[str, str]] = set()
        for e in entries:
            ratio = f"x{e['vs_fastest_peer']:.2f}" if e["vs_fastest_peer"] is not None else ""
            lines.append(
                f"{e['trainer']:<18} {e['length']:>5} {e['status']:<22} "
                f"{cell(e['tokens_per_s']):>8} tok/s {ratio:<6} peak {gib(e['peak_allocated_gib'])}"
                f"/{gib(e['peak_reserved_gib'])} GiB load {cell(e['load_s'], 1)} s "
                f"losses {[round(x, 3) for x in e['losses'][:3]]}"
            )
            if e["status"] != "ok" and e["error"] and (e["trainer"], e["error"]) not in shown:
                shown.add((e["trainer"], e["error"]))
                lines.append(f"    {str(e['error'])[:300]}")
        lines += [f"  target: {note}" for note in report["targets"][row]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, nargs="+", required=True)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--print", action="store_true", help="a compact table on stdout")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"error: no results file {', '.join(missing)}", file=sys.stderr)
        return 2
    report = summary(load(args.results))
    if args.md:
        write_atomic(args.md, markdown(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1, sort_keys=True) + "\n")
    if args.print or not (args.md or args.json):
        print(console(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
