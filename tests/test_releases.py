"""`--check --against` and `--matrix` on real published wheels (downloaded once, cached)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from conftest import WHEEL_CACHE, wheel
from packaging.requirements import Requirement
from packaging.version import Version

from patches import commands
from patches.compare import Cell
from patches.releases import _parse_versions, select_releases

pytestmark = pytest.mark.wheels

OLD_STACK = ("transformers==5.5.4", "peft==0.19.1", "bitsandbytes==0.49.2")
MODELING = "transformers/models/gemma4/modeling_gemma4.py"


@pytest.fixture
def tool_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private stackpatch cache whose wheels/ is the suite's shared wheel cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "wheels").symlink_to(WHEEL_CACHE)
    monkeypatch.setenv("STACKPATCH_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No package index at all: pip may only look in an (empty) local folder."""
    links = tmp_path / "no-index"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


@pytest.fixture
def matrix_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    matrix, status = tmp_path / "matrix.json", tmp_path / "STATUS.md"
    monkeypatch.setattr(commands, "MATRIX_FILE", matrix)
    monkeypatch.setattr(commands, "STATUS_FILE", status)
    monkeypatch.setattr("patches.status_doc.MATRIX_FILE", matrix)
    return matrix, status


def edited_wheel(spec: str, directory: Path, version: str | None = None) -> Path:
    """A copy of a real wheel whose P10 target function was renamed (and maybe re-versioned)."""
    name, original = spec.split("==")
    version = version or original
    source = wheel(spec)
    target = directory / source.name.replace(f"-{original}-", f"-{version}-")
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            data = src.read(item.filename)
            member = item.filename.replace(
                f"{name}-{original}.dist-info", f"{name}-{version}.dist-info"
            )
            if member.endswith(".dist-info/METADATA"):
                data = data.replace(
                    f"Version: {original}".encode(), f"Version: {version}".encode(), 1
                )
            if member == MODELING:
                edited = data.replace(
                    b"def create_causal_mask_mapping(", b"def build_mask_mapping("
                )
                assert edited != data
                data = edited
            out.writestr(member, data)
    return target


def by_id(result) -> dict[str, dict]:
    return {f"{p['id']}@{p['candidate_version']}": p for p in result.json["patches"]}


def test_against_requirements_says_what_an_upgrade_changes(install, cli, tool_cache) -> None:
    site = install(*OLD_STACK)
    result = cli(
        "--check",
        "--json",
        "--site-packages",
        str(site),
        "--against",
        "transformers==5.6.0",
        "--against",
        "peft==0.21.2",
        "--against",
        "bitsandbytes==0.50.2",
    )
    assert result.code == 0, result.err
    rows = by_id(result)
    assert {k: (v["installed_state"], v["candidate_state"]) for k, v in rows.items()} == {
        "P10@5.6.0": ("pending", "fixed-upstream"),
        "P13@5.6.0": ("pending", "pending"),
        "P12@0.21.2": ("pending", "pending"),
        "P14@0.21.2": ("pending", "pending"),
        "P15@0.21.2": ("pending", "pending"),
        "P16@5.6.0": ("pending", "pending"),
        "P4@5.6.0": ("skipped", "skipped"),
        "P5@5.6.0": ("skipped", "skipped"),
        "P6@5.6.0": ("skipped", "skipped"),
        "P7@5.6.0": ("skipped", "skipped"),
        "P8@0.21.2": ("skipped", "skipped"),
        "P1@0.50.2": ("skipped", "skipped"),
        "P2@0.50.2": ("pending", "pending"),
        "P9@0.50.2": ("skipped", "skipped"),
        "P3@0.50.2": ("skipped", "skipped"),
        "P11@0.50.2": ("pending", "fixed-upstream"),
        "P17@0.50.2": ("pending", "pending"),
        "P18@5.6.0": ("pending", "pending"),
        "P19@5.6.0": ("pending", "pending"),
        "P20@5.6.0": ("pending", "pending"),
    }
    assert rows["P10@5.6.0"]["change"] == "no longer needed after upgrading"
    assert rows["P13@5.6.0"]["change"] == "still needed: run --apply after upgrading"
    assert result.json["installed"]["transformers"] == "5.5.4"
    # Nothing in the environment was touched.
    assert not (site / ".stackpatch").exists()


def test_against_after_apply_names_the_patches_to_reapply(install, cli, tool_cache) -> None:
    site = install(*OLD_STACK)
    assert cli("--apply", "-q", "--site-packages", str(site)).code == 0
    result = cli("--site-packages", str(site), "--against", "transformers==5.23.0")
    assert result.code == 0, result.err
    assert "applied" in result.out and "still needed: run --apply after upgrading" in result.out
    assert "no longer needed after upgrading" in result.out  # P10


def test_against_a_wheel_file_works_offline(install, cli, tool_cache, offline) -> None:
    site = install(*OLD_STACK)
    result = cli(
        "--json", "--site-packages", str(site), "--against", str(wheel("transformers==5.23.0"))
    )
    assert result.code == 0, result.err
    assert by_id(result)["P10@5.23.0"]["candidate_state"] == "fixed-upstream"
    # A pinned requirement whose wheel is cached needs no index either.
    result = cli("--json", "--site-packages", str(site), "--against", "transformers==5.23.0")
    assert result.code == 0, result.err
    assert by_id(result)["P13@5.23.0"]["candidate_state"] == "pending"


def test_against_an_unpacked_directory(install, cli, tool_cache) -> None:
    newer = install("transformers==5.23.0", "bitsandbytes==0.50.2")
    newer = newer.rename(newer.parent / "newer")
    site = install(*OLD_STACK)
    result = cli("--json", "--site-packages", str(site), "--against", str(newer))
    assert result.code == 0, result.err
    rows = by_id(result)
    assert rows["P11@0.50.2"]["candidate_state"] == "fixed-upstream"
    assert rows["P13@5.23.0"]["candidate_state"] == "pending"


def test_against_a_release_whose_target_was_edited_fails(
    install, cli, tool_cache, tmp_path
) -> None:
    site = install(*OLD_STACK)
    broken = edited_wheel("transformers==5.5.4", tmp_path / "edited")
    result = cli("--site-packages", str(site), "--against", str(broken))
    assert result.code == 1
    assert "target-missing" in result.out
    assert "problem: P10 [transformers 5.5.4] target-missing: would no longer match" in result.out
    as_json = cli("--json", "--site-packages", str(site), "--against", str(broken))
    assert as_json.code == 1 and not as_json.json["ok"]
    assert by_id(as_json)["P13@5.5.4"]["candidate_state"] == "pending"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--against", "transformers=="), "is not a requirement, a wheel file or a directory"),
        (("--against", "numpy==2.0.0"), "no patch targets numpy"),
        (("--against", "/no/such/transformers-5.5.4-py3-none-any.whl"), "no such file"),
        (("--apply", "--against", "transformers==5.6.0"), "--against goes with --check"),
        (("--all",), "--all goes with --matrix"),
        (("--matrix", "transformers>=5.5", "--verify"), "--matrix is a mode of its own"),
        (("--matrix", "left-pad>=1"), "no patch targets left-pad"),
    ],
)
def test_bad_release_arguments_exit_2(cli, tool_cache, argv, message) -> None:
    result = cli(*argv)
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_bad_release_files_exit_2(cli, tool_cache, tmp_path, offline) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fake = tmp_path / "transformers-5.5.4-py3-none-any.whl"
    fake.write_text("not a zip")
    for argv, message in [
        (("--against", str(empty)), "no dist-info of"),
        (("--against", str(fake)), "cannot be read as a wheel"),
        (("--against", "transformers==99.0.0"), "cannot download transformers==99.0.0"),
    ]:
        result = cli(*argv)
        assert result.code == 2, argv
        assert message in result.err and len(result.err.strip().splitlines()) == 1


def test_matrix_reproduces_the_known_facts_and_is_cached(
    cli, tool_cache, matrix_files, monkeypatch
) -> None:
    matrix_file, status_file = matrix_files
    ranges = ("transformers>=5.5,<=5.23.0", "peft>=0.19,<=0.21.2", "bitsandbytes>=0.49,<=0.50.2")
    first = cli("--matrix", *ranges, "--json")
    assert first.code == 0, first.err
    cells = {(c["patch"], c["version"]): c["state"] for c in first.json["cells"]}
    transformers = sorted({v for (p, v) in cells if p == "P10"}, key=Version)
    assert transformers[0] == "5.5.4" and transformers[-1] == "5.23.0" and len(transformers) == 19
    assert cells["P10", "5.5.4"] == "pending"  # needed only up to its fix release
    assert all(cells["P10", v] == "fixed-upstream" for v in transformers[1:])
    assert all(cells["P13", v] == "pending" for v in transformers)
    assert all(cells["P16", v] == "pending" for v in transformers)
    assert all(cells["P19", v] == "pending" for v in transformers)
    assert all(cells["P20", v] == "pending" for v in transformers)
    # P18: upstream sorted the layer types in 5.16.
    fixed_in = transformers.index("5.16.1")
    assert all(cells["P18", v] == "pending" for v in transformers[:fixed_in])
    assert all(cells["P18", v] == "fixed-upstream" for v in transformers[fixed_in:])
    assert (cells["P2", "0.49.2"], cells["P2", "0.50.2"]) == ("pending", "pending")
    assert (cells["P11", "0.49.2"], cells["P11", "0.50.2"]) == ("pending", "fixed-upstream")
    assert (cells["P17", "0.49.2"], cells["P17", "0.50.2"]) == ("pending", "pending")
    assert [cells["P12", v] for v in ("0.19.1", "0.20.0", "0.21.2")] == ["pending"] * 3
    assert first.json["problems"] == []
    written = json.loads(matrix_file.read_text())
    assert written["cells"] == first.json["cells"]
    status = status_file.read_text()
    assert (
        "## Release matrix" in status
        and "| 5.6.2 | skipped | skipped | skipped | skipped | fixed-upstream | pending | pending "
        "| pending | pending |"
        in status
    )

    # The second run needs no index: versions, wheels, trees and cells all come from the cache.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tool_cache / "nowhere"))
    second = cli("--matrix", *ranges, "--json")
    assert second.code == 0, second.err
    assert second.json["cells"] == first.json["cells"]


def test_matrix_all_lists_every_patch_release(cli, tool_cache, matrix_files) -> None:
    result = cli("--matrix", "transformers>=5.5,<5.7", "--all", "--json")
    assert result.code == 0, result.err
    p10 = {c["version"]: c["state"] for c in result.json["cells"] if c["patch"] == "P10"}
    assert p10 == {
        **{f"5.5.{n}": "pending" for n in range(5)},
        **{f"5.6.{n}": "fixed-upstream" for n in range(3)},
    }


def test_matrix_flags_a_new_release_that_breaks_a_patch(
    cli, tool_cache, matrix_files, offline
) -> None:
    # A "new release" published on a local index: in P10's range, its target function renamed.
    edited_wheel("transformers==5.5.4", offline, version="5.5.99")
    result = cli("--matrix", "transformers>=5.5")
    assert result.code == 1
    assert "target-missing !" in result.out
    assert (
        "problem: P10: transformers 5.5.99 is in the declared range but the patch no longer "
        "matches" in " ".join(result.out.split())
    )
    assert "target-missing !" in matrix_files[1].read_text()


def test_release_selection_keeps_the_newest_patch_per_minor() -> None:
    versions = _parse_versions(
        "transformers (5.6.2)\n"
        "Available versions: 5.6.2, 5.6.1, 5.6.0, 5.5.4, 5.5.0, 5.7.0rc1, 4.57.6"
    )
    assert len(versions) == 7
    requirement = Requirement("transformers>=5.5")
    assert [str(v) for v in select_releases(versions, requirement, False)] == ["5.5.4", "5.6.2"]
    assert [str(v) for v in select_releases(versions, requirement, True)] == [
        "5.5.0",
        "5.5.4",
        "5.6.0",
        "5.6.1",
        "5.6.2",
    ]


def test_only_in_range_contradictions_are_problems() -> None:
    def cell(state: str, in_range: bool, recommended: bool = True) -> Cell:
        return Cell("P10", "transformers", "5.6.0", state, "detail", in_range, recommended)

    assert cell("pending", True).problem is None
    assert cell("fixed-upstream", False).problem is None
    assert cell("target-missing", True, recommended=False).problem is None
    assert "narrow `affected` to end before 5.6.0" in (cell("fixed-upstream", True).problem or "")
    assert "no longer matches (detail)" in (cell("target-missing", True).problem or "")
