"""Bad input gets a clear one-line error and an exit code, and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_process, snapshot

from patches.store import StateStore

MODELING = "transformers/models/gemma4/modeling_gemma4.py"


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0]


def test_unknown_patch_id(synthetic_site: Path, cli) -> None:
    before = snapshot(synthetic_site)
    result = cli("--apply", "--only", "P10,P99", "--site-packages", str(synthetic_site))
    known = "known ids: P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13, P14, P15, P16, P17"
    assert_one_line_error(result, "unknown patch id P99", known)
    assert snapshot(synthetic_site) == before


def test_conflicting_modes_are_a_usage_error(cli) -> None:
    assert_one_line_error(cli("--apply", "--revert"), "not allowed with")


def test_python_that_does_not_exist(cli) -> None:
    assert_one_line_error(cli("--python", "/no/such/python"), "does not exist")


def test_python_that_is_not_executable(tmp_path: Path, cli) -> None:
    script = tmp_path / "python"
    script.write_text("not a program")
    assert_one_line_error(cli("--python", str(script)), "not an executable")


def test_python_that_is_not_python(cli) -> None:
    true = shutil.which("true")
    assert true
    assert_one_line_error(cli("--python", true), "did not answer as a Python")


def test_site_packages_that_is_not_a_directory(tmp_path: Path, cli) -> None:
    assert_one_line_error(cli("--site-packages", str(tmp_path / "nope")), "not a directory")


def test_nothing_installed_is_reported_not_an_error(tmp_path: Path, cli) -> None:
    result = cli("--check", "--json", "--site-packages", str(tmp_path))
    assert result.code == 0
    assert set(result.states().values()) == {"not-installed", "skipped"}
    verify = cli("--verify", "-q", "--site-packages", str(tmp_path))
    assert verify.code == 0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{ this is not json", "is corrupt"),
        (json.dumps({"format": "pip-something", "files": []}), "not a stackpatch manifest"),
        (json.dumps({"format": "stackpatch-manifest", "format_version": 99}), "format version 99"),
        (
            json.dumps({"format": "stackpatch-manifest", "format_version": 1, "files": [{"x": 1}]}),
            "malformed file record",
        ),
    ],
    ids=["corrupt", "foreign", "future", "malformed"],
)
@pytest.mark.parametrize("command", ["--check", "--apply", "--verify", "--revert"])
def test_bad_manifest_is_refused_and_kept(
    synthetic_site: Path, cli, command: str, content: str, needle: str
) -> None:
    state = synthetic_site / ".stackpatch"
    state.mkdir()
    (state / "manifest.json").write_text(content)
    before = snapshot(synthetic_site)
    assert_one_line_error(cli(command, "--site-packages", str(synthetic_site)), needle)
    assert snapshot(synthetic_site) == before


def test_missing_backup_at_revert(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    cli("--apply", "-q", *site)
    backups = synthetic_site / ".stackpatch" / "backups"
    victim = sorted(backups.iterdir())[0]
    victim.unlink()
    before = snapshot(synthetic_site)
    result = cli("--revert", *site)
    assert_one_line_error(result, "backup of", "is missing", "reinstall")
    assert snapshot(synthetic_site) == before  # the other file was not reverted either


def test_corrupted_backup_at_revert(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    cli("--apply", "-q", *site)
    victim = sorted((synthetic_site / ".stackpatch" / "backups").iterdir())[0]
    victim.write_bytes(b"garbage")
    before = snapshot(synthetic_site)
    assert_one_line_error(cli("--revert", *site), "does not match its recorded hash")
    assert snapshot(synthetic_site) == before


def test_hand_edit_after_apply(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    cli("--apply", "-q", *site)
    target = synthetic_site / MODELING
    target.write_text(target.read_text() + "\n# my local tweak\n")
    before = snapshot(synthetic_site)

    verify = cli("--verify", "--json", *site)
    assert verify.code == 1
    assert verify.states()["P10"] == "drifted"
    p10 = next(p for p in verify.json["patches"] if p["id"] == "P10")
    assert "edited after stackpatch patched it" in p10["detail"]

    apply = cli("--apply", "-q", *site)
    assert apply.code == 1
    assert snapshot(synthetic_site) == before

    assert_one_line_error(cli("--revert", *site), "edited after stackpatch patched it")
    assert snapshot(synthetic_site) == before


def test_concurrent_apply_is_refused(synthetic_site: Path) -> None:
    before = snapshot(synthetic_site)
    store = StateStore(synthetic_site, synthetic_site / ".stackpatch")
    with store.locked():
        # A second process, as a second terminal would be.
        result = run_cli_process("--apply", "--site-packages", str(synthetic_site))
    assert_one_line_error(result, "another stackpatch run is changing")
    assert snapshot(synthetic_site) == before


def _read_only_run(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with `site` mounted read-only (a private mount namespace, no root needed)."""
    root = Path(__file__).resolve().parent.parent
    command = (
        f"mount --bind {site} {site} && mount -o remount,ro,bind {site} && "
        f"{sys.executable} {root / 'apply_patches.py'} {' '.join(argv)}"
    )
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", command],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
    )


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("command", ["--apply", "--revert"])
def test_read_only_site_packages(synthetic_site: Path, cli, command: str) -> None:
    if command == "--revert":
        cli("--apply", "-q", "--site-packages", str(synthetic_site))
    before = snapshot(synthetic_site)
    completed = _read_only_run(synthetic_site, command, "--site-packages", str(synthetic_site))
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to")
    assert "nothing was changed" in lines[0]
    assert snapshot(synthetic_site) == before


def test_check_works_on_read_only_site_packages(synthetic_site: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    completed = _read_only_run(
        synthetic_site, "--check", "-q", "--site-packages", str(synthetic_site)
    )
    assert completed.returncode == 0, completed.stderr


def test_unexpected_exception_is_one_line(monkeypatch, synthetic_site: Path, cli) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("patches.commands.make_plan", boom)
    monkeypatch.delenv("STACKPATCH_DEBUG", raising=False)
    result = cli("--check", "--site-packages", str(synthetic_site))
    assert_one_line_error(result, "internal error (RuntimeError: simulated bug)")


def test_errors_exit_two_in_a_real_process(tmp_path: Path) -> None:
    result = run_cli_process("--python", str(tmp_path / "missing"))
    assert_one_line_error(result, "does not exist")
    assert os.path.exists(Path(__file__).parent.parent / "apply_patches.py")


@pytest.mark.parametrize("script", ["apply_patches.py", "pip_and_patch.py"])
def test_interpreter_without_the_tool_dependencies(tmp_path: Path, script: str) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    root = Path(__file__).resolve().parent.parent
    completed = subprocess.run(
        [str(venv / "bin" / "python"), str(root / script), "--verify"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: stackpatch needs ")
    assert "pip install -r requirements.txt" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
