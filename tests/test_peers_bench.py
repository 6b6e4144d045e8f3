"""bench/peers (issue 13): the parts that need no torch, GPU or peer package.

The measurement arithmetic, the results file, the shared tokens file, the wheel repacking,
the report and run.sh's argument handling. The adapters themselves run on the GPU machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(PEERS))

import measure  # noqa: E402
import preflight  # noqa: E402
import report  # noqa: E402
import tokens  # noqa: E402
import wheels  # noqa: E402
from adapter_axolotl import check  # noqa: E402

# -- measure ---------------------------------------------------------------------------------


def test_cap_fraction_is_the_share_of_the_device_and_never_above_one() -> None:
    assert measure.cap_fraction(23, 139 * 2**30) == pytest.approx(23 / 139)
    assert measure.cap_fraction(200, 80 * 2**30) == 1.0
    with pytest.raises(ValueError):
        measure.cap_fraction(0, 80 * 2**30)


def test_vm_hwm_is_read_in_gib_from_proc_status() -> None:
    status = "Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t 2097152 kB\nVmRSS:\t 1024 kB\n"
    assert measure.vm_hwm_gib(status) == 2.0
    assert measure.vm_hwm_gib("Name:\tpython\n") is None
    with pytest.raises(ValueError):
        measure.vm_hwm_gib("VmHWM:\t 5 MB\n")


def test_tokens_per_second_is_the_median_of_steps_from_the_third() -> None:
    # steps 1-2 are slow warm-up and must not count; median of 1000/1, 1000/2, 1000/4
    seconds = [30.0, 9.0, 1.0, 2.0, 4.0]
    assert measure.median_tokens_per_s(seconds, [1000] * 5) == 500.0
    assert measure.median_tokens_per_s(seconds[:2], [1000] * 2) is None
    with pytest.raises(ValueError):
        measure.median_tokens_per_s([1.0], [1, 2])


def test_an_out_of_memory_error_is_described_as_such_with_its_exact_text() -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    try:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except OutOfMemoryError as exc:
        described = measure.describe_error(exc)
    assert described["oom"] is True
    assert described["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert described["error_type"].endswith("OutOfMemoryError")
    assert described["error_where"][-1].startswith("test_peers_bench.py:")
    assert measure.describe_error(ValueError("bad shape"))["oom"] is False


def test_results_lines_append_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    measure.append_line(path, {"kind": "start", "n": 1})
    measure.append_line(path, {"kind": "length", "n": 2})
    with path.open("a") as handle:
        handle.write('{"kind": "len')  # killed mid-write
    assert [r["n"] for r in measure.read_lines(path)] == [1, 2]


def test_step_clock_times_from_one_step_end_to_the_next() -> None:
    clock = measure.StepClock()
    with pytest.raises(RuntimeError):
        clock.step_end(10)
    clock.start()
    for loss in (9.0, 8.5, 8.0):
        clock.step_end(512, loss)
    summary = clock.summary()
    assert summary["steps"] == 3 and summary["step_tokens"] == [512] * 3
    assert summary["losses"] == [9.0, 8.5, 8.0] and summary["last_loss"] == 8.0
    assert all(s >= 0 for s in summary["step_s"]) and summary["tokens_per_s"] is not None


def test_sigterm_becomes_deadline_reached_once() -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        measure.install_deadline_handler()
        with pytest.raises(measure.DeadlineReached):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; this is a fallback
        # a second TERM is no longer caught: the handler put the default back
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert not issubclass(measure.DeadlineReached, Exception)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_lengths_parse_and_bad_ones_say_which(capsys: pytest.CaptureFixture[str]) -> None:
    assert measure.parse_lengths("512 2048,4096") == [512, 2048, 4096]
    for bad in ("", "512 x", "1"):
        with pytest.raises(ValueError, match="lengths"):
            measure.parse_lengths(bad)


def test_exit_record_keeps_the_log_tail_of_a_process_that_died(tmp_path: Path) -> None:
    results, log = tmp_path / "r.jsonl", tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    measure.append_line(results, {"kind": "start", "trainer": "unsloth", "row": "attn"})
    assert measure.exit_record([str(results), "unsloth", "attn", "137", str(log)]) == 0
    last = measure.read_lines(results)[-1]
    assert last["kind"] == "exit" and last["rc"] == 137 and last["had_start_line"] is True
    assert last["log_tail"].splitlines()[-1] == "line 29" and "line 14" not in last["log_tail"]


def test_summary_line_shows_status_rate_memory_and_error() -> None:
    line = measure.summary_line(
        {
            "kind": "length",
            "trainer": "unsloth",
            "row": "attn",
            "length": 2048,
            "status": "oom",
            "tokens_per_s": None,
            "steps": 1,
            "peak_allocated_gib": 22.9,
            "peak_reserved_gib": 23.0,
            "losses": [9.1],
            "error_type": "torch.OutOfMemoryError",
            "error": "CUDA out of memory",
        }
    )
    assert line.startswith("unsloth/attn 2048 tokens: oom")
    assert "22.9 / 23.0 GiB" in line and "CUDA out of memory" in line


# -- the shared tokens -----------------------------------------------------------------------


class WordTokenizer:
    """Just enough of a tokenizer for examples/chat_data.py: a template and offsets."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        text = "".join(f"<{m['role']}> {m['content']} </turn> " for m in messages)
        return text + ("<assistant> " if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens, return_offsets_mapping):
        ids, offsets, start = [], [], 0
        for word in text.split():
            begin = text.index(word, start)
            start = begin + len(word)
            ids.append(int(hashlib.sha256(word.encode()).hexdigest()[:4], 16))
            offsets.append((begin, start))
        return {"input_ids": ids, "offset_mapping": offsets}


def write_chat(path: Path, rows: int, words: int) -> None:
    line = {
        "messages": [
            {"role": "user", "content": "q0 q1 q2 q3"},
            {"role": "assistant", "content": " ".join(f"a{i}" for i in range(words))},
        ]
    }
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(rows)))


def test_tokens_file_round_trips_with_the_examples_labels(tmp_path: Path) -> None:
    write_chat(tmp_path / "chat16.jsonl", rows=4, words=20)
    document = tokens.tokenize(WordTokenizer(), tmp_path / "chat16.jsonl", 16)
    assert document["truncated"] == 4 and document["sha256"] == tokens.rows_digest(document["rows"])
    path = tokens.tokens_path(tmp_path, 16)
    measure.write_atomic(path, json.dumps(document))
    rows = tokens.load(path, 16, needed=3)
    assert len(rows) == 3 and all(len(r["input_ids"]) == 16 for r in rows)
    # "<user> q0 q1 q2 q3 </turn> <assistant>" is the prompt; the answer's words are targets
    first = rows[0]
    assert first["labels"][:7] == [tokens.IGNORE_INDEX] * 7
    assert first["labels"][7:] == first["input_ids"][7:]


def test_tokens_file_refuses_what_the_benchmark_cannot_train_on(tmp_path: Path) -> None:
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]} for _ in range(3)]
    document = {"length": 4, "rows": rows, "sha256": tokens.rows_digest(rows)}
    path = tmp_path / "tokens4.json"
    path.write_text(json.dumps(document))
    assert len(tokens.load(path, 4, needed=3)) == 3
    with pytest.raises(tokens.TokensProblem, match="one per step"):
        tokens.load(path, 4, needed=4)
    with pytest.raises(tokens.TokensProblem, match="not 8"):
        tokens.load(path, 8, needed=1)
    path.write_text(json.dumps({**document, "sha256": "0" * 64}))
    with pytest.raises(tokens.TokensProblem, match="sha256"):
        tokens.load(path, 4, needed=1)
    untargeted = [{"input_ids": [1, 2, 3, 4], "labels": [1, -100, -100, -100]}]
    path.write_text(
        json.dumps({"length": 4, "rows": untargeted, "sha256": tokens.rows_digest(untargeted)})
    )
    with pytest.raises(tokens.TokensProblem, match="no target"):
        tokens.load(path, 4, needed=1)
    with pytest.raises(tokens.TokensProblem, match="cannot read"):
        tokens.load(tmp_path / "missing.json", 4, needed=1)


# -- wheels ----------------------------------------------------------------------------------


def make_wheel(path: Path, files: dict[str, bytes]) -> None:
    import base64

    record_lines = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 6)), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record_lines.append(f"{name},sha256={digest.decode()},{len(data)}\n")
        record = "demo-1.0.dist-info/RECORD"
        record_lines.append(f"{record},,\n")
        archive.writestr(zipfile.ZipInfo(record, (2026, 1, 2, 3, 4, 6)), "".join(record_lines))


def test_repack_removes_only_what_it_is_told_and_is_reproducible(tmp_path: Path) -> None:
    files = {
        "demo/__init__.py": b"import demo.core\n",
        "demo/core.py": b"x = 1\n" * 100,
        "studio/app.js": b"console.log(1)\n",
        "studio/backend/server.py": b"print('web')\n",
        "demo-1.0.dist-info/METADATA": b"Name: demo\nVersion: 1.0\n",
    }
    make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", files)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    removed = wheels.repack(
        tmp_path / "demo-1.0-py3-none-any.whl", first / "demo.whl", wheels.drop_studio
    )
    wheels.repack(tmp_path / "demo-1.0-py3-none-any.whl", second / "demo.whl", wheels.drop_studio)
    assert removed == ["studio/app.js", "studio/backend/server.py"]
    assert wheels.sha256_file(first / "demo.whl") == wheels.sha256_file(second / "demo.whl")
    wheels.verify_record(first / "demo.whl")
    with zipfile.ZipFile(first / "demo.whl") as archive:
        assert [i.filename for i in archive.infolist()] == [
            "demo/__init__.py",
            "demo/core.py",
            "demo-1.0.dist-info/METADATA",
            "demo-1.0.dist-info/RECORD",
        ]
        for name in ("demo/__init__.py", "demo/core.py", "demo-1.0.dist-info/METADATA"):
            assert archive.read(name) == files[name]
        assert archive.getinfo("demo/core.py").date_time == (2026, 1, 2, 3, 4, 6)
        assert b"studio" not in archive.read("demo-1.0.dist-info/RECORD")


def test_verify_record_catches_a_file_that_does_not_match(tmp_path: Path) -> None:
    make_wheel(tmp_path / "w.whl", {"demo/a.py": b"a\n"})
    with zipfile.ZipFile(tmp_path / "w.whl", "a") as archive:
        archive.writestr("demo/extra.py", b"not listed\n")
    with pytest.raises(ValueError, match="disagree"):
        wheels.verify_record(tmp_path / "w.whl")


def test_bitsandbytes_keeps_its_cpu_and_cuda_13_libraries_only() -> None:
    drop = wheels.drop_other_native_libraries
    assert not drop("bitsandbytes/libbitsandbytes_cuda130.so")
    assert not drop("bitsandbytes/libbitsandbytes_cpu.so")
    assert not drop("bitsandbytes/functional.py")
    assert not drop("bitsandbytes/nn/libbitsandbytes_cuda121.so")  # not the package's own
    for name in ("cuda118", "cuda128", "cuda132", "rocm64", "rocm72", "xpu2026"):
        assert drop(f"bitsandbytes/libbitsandbytes_{name}.so")
    assert not drop("bitsandbytes/libbitsandbytes_cuda132.so", cuda="132")


def test_preflight_flags_a_wheel_that_is_not_the_manifests(tmp_path: Path) -> None:
    good, bad = tmp_path / "good-1-py3-none-any.whl", tmp_path / "bad-1-py3-none-any.whl"
    good.write_bytes(b"good")
    bad.write_bytes(b"bad")
    manifest = {"wheels": [{"file": good.name, "sha256": wheels.sha256_file(good)}]}
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    assert preflight.check_wheels(tmp_path / "MANIFEST.json", [good]) == []
    assert preflight.check_wheels(tmp_path / "MANIFEST.json", [bad]) == [
        f"{bad.name}: not in {tmp_path / 'MANIFEST.json'}"
    ]
    good.write_bytes(b"changed")
    assert "sha256 differs" in preflight.check_wheels(tmp_path / "MANIFEST.json", [good])[0]


# -- axolotl's check -------------------------------------------------------------------------


def test_axolotl_check_sorts_requirements_into_conflicts_and_missing() -> None:
    lines = [
        "torch<2.15.0,>=2.13.0",
        "transformers==5.20.1",
        "accelerate==1.15.0",
        "wandb",
        'xformers>=0.0.33; sys_platform == "nonexistent"',
        'pytest; extra == "dev"',
    ]
    found = check(
        lines, {"torch": "2.11.0+cu130", "transformers": "5.17.0", "accelerate": "1.15.0"}
    )
    assert found["conflicts"] == [
        "torch<2.15.0,>=2.13.0 (installed 2.11.0+cu130)",
        "transformers==5.20.1 (installed 5.17.0)",
    ]
    assert found["missing"] == ["wandb"]
    assert found["satisfied"] == ["accelerate"]


# -- report ----------------------------------------------------------------------------------


def length_line(trainer, row, pid, length, rate, peak, status="ok", **extra):
    return {
        "kind": "length",
        "trainer": trainer,
        "row": row,
        "pid": pid,
        "time": f"2026-12-02T05:{pid % 60:02d}:{length % 60:02d}Z",
        "length": length,
        "status": status,
        "tokens_per_s": rate,
        "peak_allocated_gib": peak,
        "peak_reserved_gib": peak + 0.5 if peak else None,
        "losses": [9.1, 9.0],
        "steps": 10,
        **extra,
    }


def start_line(trainer, row, pid, lengths=(512, 2048)):
    return {
        "kind": "start",
        "trainer": trainer,
        "row": row,
        "pid": pid,
        "time": f"2026-12-02T05:{pid % 60:02d}:00Z",
        "settings": {"lengths": list(lengths)},
        "versions": {"unsloth": "2026.10.9", "transformers": "5.17.0"},
        "cap_gib": 23.0,
        "device": "NVIDIA H200",
    }


def sample_records() -> list[dict]:
    return [
        start_line("stackpatch", "attn", 1),
        {
            "kind": "loaded",
            "trainer": "stackpatch",
            "row": "attn",
            "pid": 1,
            "load_s": 50.0,
            "time": "2026-12-02T05:01:00Z",
        },
        length_line("stackpatch", "attn", 1, 512, 700.0, 14.5),
        length_line("stackpatch", "attn", 1, 2048, 3000.0, 16.7),
        start_line("unsloth", "attn", 2),
        length_line("unsloth", "attn", 2, 512, 500.0, 15.0),
        length_line("unsloth", "attn", 2, 2048, 1500.0, 18.0),
        start_line("experts4bit-qlora", "attn", 3),
        length_line("experts4bit-qlora", "attn", 3, 512, 600.0, 13.0),
        length_line(
            "experts4bit-qlora", "attn", 3, 2048, None, 22.9, status="oom", error="CUDA out of"
        ),
        {
            "kind": "exit",
            "trainer": "experts4bit-qlora",
            "row": "attn",
            "rc": 0,
            "time": "2026-12-02T05:03:59Z",
        },
        {
            "kind": "unavailable",
            "trainer": "axolotl",
            "row": "attn",
            "status": "not_run",
            "error": "pins torch>=2.13",
            "time": "2026-12-02T05:04:00Z",
        },
    ]


def test_report_ratios_are_against_the_fastest_peer_at_each_length() -> None:
    entries = report.table(report.attempts(sample_records()), "attn")
    by = {(e["trainer"], e["length"]): e for e in entries}
    assert by["stackpatch", 512]["vs_fastest_peer"] == round(700 / 600, 2)
    assert by["stackpatch", 512]["fastest_peer"] == "experts4bit-qlora"
    assert by["stackpatch", 2048]["vs_fastest_peer"] == 2.0  # unsloth: e4b ran out of memory
    assert by["experts4bit-qlora", 2048]["status"] == "oom"
    assert by["experts4bit-qlora", 2048]["error"] == "CUDA out of"
    assert by["axolotl", 512]["status"] == "not_run at check"
    assert by["stackpatch", 512]["load_s"] == 50.0
    assert [e["trainer"] for e in entries[:2]] == ["stackpatch", "stackpatch"]


def test_report_targets_are_judged_from_the_table() -> None:
    entries = report.table(report.attempts(sample_records()), "attn")
    notes = report.targets(entries)
    assert notes[0].startswith("speed at 2048 tokens: 2.00× the fastest peer (unsloth")
    assert notes[0].endswith("met") and "not met" not in notes[0]
    assert "16.70 GiB against the leanest peer's 18.00 GiB" in notes[1]
    assert notes[2].endswith("met")
    slow = [{**e, "tokens_per_s": 1600.0} if e["trainer"] == "stackpatch" else e for e in entries]
    assert report.targets(slow)[0].endswith("not met")


def test_report_takes_the_latest_attempt_that_reached_a_length() -> None:
    records = [
        start_line("unsloth", "attn", 7),
        length_line("unsloth", "attn", 7, 512, 400.0, 15.0),
        {
            "kind": "exit",
            "trainer": "unsloth",
            "row": "attn",
            "rc": 124,
            "time": "2026-12-02T05:07:59Z",
        },
        start_line("unsloth", "attn", 9),
        {
            "kind": "failed",
            "trainer": "unsloth",
            "row": "attn",
            "pid": 9,
            "stage": "load",
            "status": "error",
            "error": "boom",
            "time": "2026-12-02T05:09:30Z",
        },
    ]
    grouped = report.attempts(records)
    assert [a.pid for a in grouped["unsloth", "attn"]] == [7, 9]
    picked = report.chosen(grouped["unsloth", "attn"])
    assert picked.pid == 7 and picked.exit_code == 124
    entries = report.table(grouped, "attn")
    assert [(e["length"], e["status"]) for e in entries] == [
        (512, "ok"),
        (2048, "not reached (time limit)"),
    ]
    cut = [*records[:2], length_line("unsloth", "attn", 7, 2048, 1400.0, 16.0, status="timeout")]
    cut[-1]["steps"] = 6
    entries = report.table(report.attempts(cut), "attn")
    assert [(e["status"], e["tokens_per_s"]) for e in entries] == [
        ("ok", 400.0),
        ("timeout after 6 steps", 1400.0),
    ]
    failed = [*records[:2], length_line("unsloth", "attn", 7, 2048, 900.0, 22.9, status="oom")]
    assert report.table(report.attempts(failed), "attn")[1]["tokens_per_s"] is None


def test_report_keeps_each_length_from_the_call_that_measured_it() -> None:
    """One call reached 512 tokens only, a later one (asked for 2,048 alone) reached 2,048: the
    table has both results, each with its own process's figures."""
    first = [start_line("unsloth", "attn", 7), length_line("unsloth", "attn", 7, 512, 400.0, 15.0)]
    later = [
        start_line("unsloth", "attn", 11, lengths=(2048,)),
        length_line("unsloth", "attn", 11, 2048, 1500.0, 16.0),
    ]
    entries = report.table(report.attempts(first + later), "attn")
    assert [(e["length"], e["status"], e["tokens_per_s"]) for e in entries] == [
        (512, "ok", 400.0),
        (2048, "ok", 1500.0),
    ]


def test_report_writes_markdown_and_json(tmp_path: Path) -> None:
    results = tmp_path / "peers.jsonl"
    for record in sample_records():
        measure.append_line(results, record)
    measure.append_line(
        results,
        {
            "kind": "setup",
            "time": "2026-12-02T04:59:00Z",
            "gpu": "NVIDIA H200, 143771 MiB, 580.1",
            "machine_versions": {"torch": "2.11.0+cu130"},
            "wheels": [
                {
                    "file": "unsloth-2026.10.9-py3-none-any.whl",
                    "bytes": 2207661,
                    "sha256": "a" * 64,
                    "official_sha256": "b" * 64,
                    "repacked": True,
                    "removed": ["studio/ (2034 files)"],
                }
            ],
        },
    )
    md, js = tmp_path / "peers.md", tmp_path / "peers.json"
    assert report.main(["--results", str(results), "--md", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "## LoRA r16 α16 on q/k/v/o" in text and "NVIDIA H200" in text
    assert "| stackpatch | 2,048 | ok | 3,000 | 2.00 |" in text
    assert "studio/ (2034 files)" in text and "`" + "b" * 64 + "`" in text
    assert "pins torch>=2.13" in text
    assert json.loads(js.read_text())["tables"]["attn"][0]["trainer"] == "stackpatch"
    assert report.main(["--results", str(tmp_path / "none.jsonl")]) == 2


# -- run.sh ----------------------------------------------------------------------------------


def test_run_sh_parses_and_refuses_an_unknown_trainer_in_one_line(tmp_path: Path) -> None:
    script = PEERS / "run.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "SITE": str(tmp_path / "site"),
    }
    for spec, message in (
        ("llamafactory", "error: unknown trainer 'llamafactory'"),
        ("unsloth:lm_head", "error: unknown row 'lm_head' in 'unsloth:lm_head'"),
    ):
        completed = subprocess.run(
            ["bash", str(script), spec], capture_output=True, text=True, env=env, check=False
        )
        lines = completed.stderr.strip().splitlines()
        assert completed.returncode == 2
        assert len(lines) == 1 and lines[0].startswith(message), completed.stderr


def test_report_shows_the_warm_up_steps_the_median_leaves_out() -> None:
    """A trainer that compiles in its first steps: the median of steps >= 3 is its steady
    rate, and the table also gives those first steps and the wall time of all of them."""
    steps = [238.4, 18.1] + [0.55] * 8
    records = [
        start_line("unsloth", "attn", 7, lengths=(2048,)),
        length_line("unsloth", "attn", 7, 2048, 3707.0, 14.7, step_s=steps),
    ]
    [entry] = report.table(report.attempts(records), "attn")
    assert entry["first_steps_s"] == [238.4, 18.1]
    assert entry["steps_wall_s"] == round(sum(steps), 1) == 260.9
    text = report.markdown(report.summary(records))
    assert "| 238.4, 18.1 | 260.9 |" in text
