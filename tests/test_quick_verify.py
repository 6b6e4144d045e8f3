"""The quick verify (`--verify -q`, `patches.api.verify_problems`) against the full engine.

Every scenario is answered twice on the synthetic site-packages: by `--verify -q` (the quick
path) and by `--verify --json` (the full engine, libcst); the problem lines and exit codes
must be the same. The scenarios the manifest settles must be answered without the full
engine, and in a subprocess where libcst, rich and the catalog's modules cannot be imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli_process, write_distribution, write_synthetic_site

from patches import __version__, probe, quick_verify
from patches.declared import UndeclaredPatch, read_catalog
from patches.environment import locate
from patches.plan import make_plan
from patches.registry import load_patches
from patches.store import StateStore, atomic_write
from patches.transaction import apply_plan

ROOT = Path(__file__).resolve().parent.parent
MODELING = "transformers/models/gemma4/modeling_gemma4.py"
LORA_MODEL = "peft/tuners/lora/model.py"  # P12 and P14
RECOMMENDED = [p.id for p in load_patches() if p.recommended]


def test_declared_metadata_is_the_registry() -> None:
    """What patches.declared reads from the catalog's source is what the registry imports."""
    assert read_catalog() == tuple(p.info for p in load_patches())


def test_a_patch_that_cannot_be_read_statically_is_named(tmp_path: Path) -> None:
    source = (ROOT / "patches" / "catalog" / "p10_text_only_training.py").read_text()
    (tmp_path / "p10_text_only_training.py").write_text(
        source.replace('affected=">=5.5.0,<5.6.0"', 'affected=">=5.5.0," + "<5.6.0"')
    )
    with pytest.raises(UndeclaredPatch, match=r"p10_text_only_training.py: PATCH's affected"):
        read_catalog(tmp_path)


def test_a_constant_defined_above_the_patch_is_read(tmp_path: Path) -> None:
    source = (ROOT / "patches" / "catalog" / "p10_text_only_training.py").read_text()
    (tmp_path / "p10_text_only_training.py").write_text(
        source.replace('affected=">=5.5.0,<5.6.0"', "affected=AFFECTED").replace(
            'FUNCTION = "', 'AFFECTED = ">=5.5.0,<5.6.0"\nFUNCTION = "'
        )
    )
    (info,) = read_catalog(tmp_path)
    assert info.affected == ">=5.5.0,<5.6.0"


# --- scenarios ---------------------------------------------------------------------------


def _original(site: Path, relative: str) -> bytes:
    record = next(
        r
        for r in json.loads((site / ".stackpatch" / "manifest.json").read_text())["files"]
        if r["path"] == relative
    )
    return (site / ".stackpatch" / "backups" / record["sha256_before"]).read_bytes()


class _Killed(BaseException):
    pass


def _interrupted_apply(site: Path, cli) -> None:
    """--apply of P10, then an apply of the rest killed after its third file: no rollback."""
    cli("--apply", "-q", "--only", "P10", "--site-packages", str(site))
    patches = load_patches()
    env = locate({p.package for p in patches}, site_packages=str(site))
    store = StateStore(env.site_packages, env.state_dir)
    manifest = store.load(__version__)
    plan = make_plan(patches, env, manifest, include_historical=False)
    backups = sum(c.needs_backup for c in plan.changes)
    calls = []

    def writer(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == backups + 1 + 3:  # backups, the in-flight manifest, three files
            raise _Killed
        atomic_write(path, data)

    import patches.transaction as transaction

    real_roll_back = transaction._roll_back
    transaction._roll_back = lambda *args: None  # a killed process rolls nothing back
    try:
        with pytest.raises(_Killed):
            apply_plan(plan, manifest, store, __version__, writer=writer)
    finally:
        transaction._roll_back = real_roll_back


def _apply(*argv: str) -> Callable[[Path, Callable], None]:
    def scenario(site: Path, cli) -> None:
        assert cli("--apply", "-q", *argv, "--site-packages", str(site)).code == 0

    return scenario


def _after_apply(change: Callable[[Path], None], *argv: str) -> Callable[[Path, Callable], None]:
    def scenario(site: Path, cli) -> None:
        _apply(*argv)(site, cli)
        change(site)

    return scenario


def _reinstall(relative: str) -> Callable[[Path], None]:
    def change(site: Path) -> None:
        (site / relative).write_bytes(_original(site, relative))

    return change


def _hand_edit(site: Path) -> None:
    target = site / MODELING
    target.write_text(target.read_text() + "\n# my local tweak\n")


def _replace(site: Path) -> None:
    (site / MODELING).write_bytes(_original(site, MODELING) + b"\n# another build\n")


def _uninstall_bitsandbytes(site: Path) -> None:
    shutil.rmtree(site / "bitsandbytes-0.49.2.dist-info")


def _outside_range(site: Path, cli) -> None:
    before = (FIXTURES / "p10" / "basic.before.py").read_text()
    write_distribution(site, "transformers", "5.6.0", {MODELING: before})


def _file_missing(site: Path, cli) -> None:
    write_distribution(site, "transformers", "5.5.1", {"transformers/__init__.py": ""})


# name -> (how the site is made, extra --verify arguments, settled by the manifest alone)
SCENARIOS: dict[str, tuple[Callable[[Path, Callable], None], tuple[str, ...], bool]] = {
    "nothing-applied": (lambda site, cli: None, (), False),
    "all-applied": (_apply(), (), True),
    "reinstalled": (_after_apply(_reinstall(MODELING)), (), True),
    "reinstalled-shared-file": (_after_apply(_reinstall(LORA_MODEL)), (), True),
    "edited-by-hand": (_after_apply(_hand_edit), (), False),
    "replaced": (_after_apply(_replace), (), False),
    "newly-needed-patch": (_apply("--skip", "P16"), (), False),
    "some-applied": (_apply("--only", "P10"), (), False),
    "interrupted-apply": (_interrupted_apply, (), False),
    "not-installed": (_after_apply(_uninstall_bitsandbytes), (), True),
    "historical-applied": (_apply("--include-historical"), ("--include-historical",), True),
    "historical-named": (_apply(), ("--only", "P1,P10"), False),
    "outside-range": (_outside_range, ("--only", "P10"), True),
    "target-file-missing": (_file_missing, ("--only", "P10"), True),
}


@pytest.fixture
def scenario_site(request, tmp_path: Path, cli) -> tuple[Path, tuple[str, ...], bool]:
    make, argv, settled = SCENARIOS[request.param]
    if request.param in ("outside-range", "target-file-missing"):
        site = tmp_path / "site"
    else:
        site = request.getfixturevalue("synthetic_site")
    make(site, cli)
    return site, argv, settled


def _quick_lines(out: str) -> list[str]:
    lines = out.splitlines()
    assert all(line.startswith("problem: ") for line in lines), out
    return [line.removeprefix("problem: ") for line in lines]


@pytest.mark.parametrize("scenario_site", list(SCENARIOS), indirect=True)
def test_quick_verify_answers_as_the_full_engine(
    scenario_site, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, argv, settled = scenario_site
    args = ("--verify", *argv, "--site-packages", str(site))
    full = cli(*args, "--json")
    assert full.code in (0, 1), full.err

    engine_runs = []
    real_engine = quick_verify._full_engine_problems

    def counted(*arguments):
        engine_runs.append(arguments)
        return real_engine(*arguments)

    monkeypatch.setattr(quick_verify, "_full_engine_problems", counted)
    quick = cli(*args, "-q")
    assert (quick.code, _quick_lines(quick.out)) == (full.code, full.json["problems"])
    assert quick.err == ""
    assert bool(engine_runs) is not settled  # settled: the manifest and hashes were enough

    # Where libcst is missing, what the manifest does not settle is a problem: the same exit
    # code, and every patch the full engine names (after an interrupted apply also the files
    # it wrote but did not record, which the full engine finds patched by their markers).
    monkeypatch.setattr(quick_verify, "_full_engine_problems", lambda *arguments: None)
    lean = cli(*args, "-q")
    assert lean.code == full.code
    named = {line.split()[0] for line in _quick_lines(lean.out)}
    expected = {line.split()[0] for line in full.json["problems"]}
    interrupted = any("interrupted" in line for line in full.json["problems"])
    assert named > expected if interrupted else named == expected


def test_without_libcst_unrecorded_patches_are_not_applied(
    synthetic_site: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("--apply", "-q", "--skip", "P16", "--site-packages", str(synthetic_site))
    monkeypatch.setattr(quick_verify, "_full_engine_problems", lambda *arguments: None)
    result = cli("--verify", "-q", "--site-packages", str(synthetic_site))
    assert result.code == 1
    assert result.out == (
        "problem: P16 [transformers 5.5.4] not applied: not recorded in this environment's "
        "manifest; run `python apply_patches.py --apply`\n"
    )


def test_without_libcst_a_backported_fix_still_fails(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The price of not parsing: upstream's fix inside the declared range (a backport) is
    fixed-upstream for the full engine, but unrecorded, so a problem without libcst."""
    site = tmp_path / "site"
    fixed = (FIXTURES / "p10" / "upstream_fix.fixed.py").read_text()
    write_distribution(site, "transformers", "5.5.4", {MODELING: fixed})
    args = ("--verify", "--only", "P10", "--site-packages", str(site))
    assert cli(*args, "-q").code == 0  # libcst is here: the full engine decides
    monkeypatch.setattr(quick_verify, "_full_engine_problems", lambda *arguments: None)
    assert "P10 [transformers 5.5.4] not applied" in cli(*args, "-q").out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--only", "P99"), "unknown patch id P99; known ids: P1, P2,"),
        (("--only", "P10", "--skip", "P10"), "--only/--skip left no patch to work on"),
        (("--python", "/no/such/python"), "does not exist"),
        (("--manifest-is-corrupt",), "is corrupt"),
    ],
)
def test_bad_input_gets_one_line(synthetic_site: Path, cli, argv: tuple[str, ...], needle: str):
    if argv == ("--manifest-is-corrupt",):
        (synthetic_site / ".stackpatch").mkdir()
        (synthetic_site / ".stackpatch" / "manifest.json").write_text("{ not json")
        argv = ("--site-packages", str(synthetic_site))
    result = cli("--verify", "-q", *argv)
    assert result.code == 2 and result.out == ""
    (line,) = result.err.splitlines()
    assert line.startswith("error: ") and needle in line


# --- the import graph, in a fresh interpreter -------------------------------------------

# Runs the command line (or the library call) with a meta-path finder in front that refuses
# libcst, rich and the catalog's modules, and reports which of them something tried to import.
BLOCKED_RUN = """
import json, sys
blocked = set(sys.argv[1].split(","))
tried = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in blocked or (name.startswith("patches.catalog.") and "catalog" in blocked):
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
if sys.argv[2] == "api":
    from patches.api import verify_problems
    for line in verify_problems(python=sys.argv[3]):
        print("problem:", line)
    code = 0
else:
    from patches.cli import main
    code = main(sys.argv[2:])
print(json.dumps(sorted(set(tried))), file=sys.stderr)
sys.exit(code)
"""


def blocked_run(blocked: str, *argv: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout, and the blocked modules something tried to import."""
    completed = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, blocked, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    *errors, tried = completed.stderr.strip().splitlines() or ["[]"]
    assert not errors, completed.stderr
    return completed.returncode, completed.stdout, json.loads(tried)


def test_verify_q_imports_neither_libcst_nor_rich_nor_the_catalog(
    synthetic_site: Path, cli
) -> None:
    site = ("--site-packages", str(synthetic_site))
    cli("--apply", "-q", *site)
    assert blocked_run("libcst,rich,catalog", "--verify", "-q", *site) == (0, "", [])

    (synthetic_site / MODELING).write_bytes(_original(synthetic_site, MODELING))
    code, out, tried = blocked_run("libcst,rich,catalog", "--verify", "-q", *site)
    assert (code, tried) == (1, [])
    assert out == (
        "problem: P10 [transformers 5.5.4] drifted: patched file changed since apply "
        f"({MODELING} is back to its original bytes (reinstalled?); run --apply)\n"
        "problem: P18 [transformers 5.5.4] drifted: patched file changed since apply "
        f"({MODELING} is back to its original bytes (reinstalled?); run --apply)\n"
    )


def test_verify_q_without_libcst_reports_what_is_not_recorded(synthetic_site: Path) -> None:
    site = ("--site-packages", str(synthetic_site))
    code, out, tried = blocked_run("libcst,rich", "--verify", "-q", *site)
    assert code == 1
    assert tried == ["libcst"]  # the full engine was tried, and is not there
    assert [line.split()[1] for line in out.splitlines()] == RECOMMENDED
    assert all("not applied" in line for line in out.splitlines())


def test_the_library_call_imports_neither_libcst_nor_rich(tmp_path: Path) -> None:
    """patches.api.verify_problems, as the training example calls it, on another interpreter's
    environment holding the synthetic distributions."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    (site,) = venv.glob("lib/python*/site-packages")
    write_synthetic_site(site)
    assert run_cli_process("--apply", "-q", "--python", python).code == 0
    assert blocked_run("libcst,rich,catalog", "api", python) == (0, "", [])
    (site / MODELING).write_bytes(_original(site, MODELING))
    code, out, tried = blocked_run("libcst,rich,catalog", "api", python)
    assert (code, tried) == (0, [])
    assert out.startswith("problem: P10 [transformers 5.5.4] drifted:")


# --- the probe reads versions without importlib.metadata ---------------------------------


def _importlib_metadata(names: list[str], search: list[str]) -> dict[str, dict[str, str]]:
    found = {}
    for name in names:
        dist = next(iter(importlib.metadata.distributions(name=name, path=search)), None)
        if dist is not None:
            found[name] = {"version": dist.version, "location": str(dist.locate_file(""))}
    return found


def test_probe_finds_what_importlib_metadata_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This interpreter's distributions, and odd ones: a name written with other separators
    # and case, an egg-info folder, an egg-info file, a dist-info without METADATA.
    (tmp_path / "Foo_Bar-1.2.dist-info").mkdir()
    (tmp_path / "Foo_Bar-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.2\n\nVersion: not a header\n"
    )
    (tmp_path / "legacy-0.3-py3.9.egg-info").mkdir()
    (tmp_path / "legacy-0.3-py3.9.egg-info" / "PKG-INFO").write_text("Name: legacy\nVersion: 0.3\n")
    (tmp_path / "single-4.0.egg-info").write_text("Metadata-Version: 1.0\nVersion: 4.0\n")
    (tmp_path / "empty-1.0.dist-info").mkdir()
    installed = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()})
    assert len(installed) > 5
    names = [*installed, "foo.bar", "FOO-bar", "legacy", "single", "empty", "not-installed"]
    search = [str(tmp_path), *sys.path]
    expected = _importlib_metadata(names, search)
    assert expected["foo.bar"]["version"] == "1.2" and "not-installed" not in expected
    # The scan alone (no importlib.metadata) finds every one that has a version.
    assert probe._scan(names, search) == {n: d for n, d in expected.items() if d["version"]}
    monkeypatch.setattr(sys, "path", search)
    assert probe.probe(names)["distributions"] == expected
