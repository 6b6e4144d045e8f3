"""The engine end to end on a synthetic site-packages: states, apply, verify, revert, diff."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import FIXTURES, HISTORICAL, snapshot, write_distribution

MODELING = "transformers/models/gemma4/modeling_gemma4.py"
MODULES = "bitsandbytes/nn/modules.py"
FUNCTIONS = "bitsandbytes/autograd/_functions.py"
LORA_MODEL = "peft/tuners/lora/model.py"
LORA_LAYER = "peft/tuners/lora/layer.py"
TUNERS_UTILS = "peft/tuners/tuners_utils.py"
P13_FILES = (
    "transformers/integrations/bitsandbytes.py",
    "transformers/quantizers/quantizer_bnb_4bit.py",
)
MODELING_UTILS = "transformers/modeling_utils.py"
CORE_MODEL_LOADING = "transformers/core_model_loading.py"
CPU_OPS = "bitsandbytes/backends/cpu/ops.py"
BITSANDBYTES_FILES = (FUNCTIONS, MODULES, CPU_OPS)
PEFT_FILES = (LORA_MODEL, LORA_LAYER, TUNERS_UTILS)
EVERY_FILE = sorted(
    [*BITSANDBYTES_FILES, *PEFT_FILES, MODELING, MODELING_UTILS, CORE_MODEL_LOADING, *P13_FILES]
)


def test_check_reports_pending_with_documented_json(synthetic_site: Path, cli) -> None:
    result = cli("--check", "--json", "--site-packages", str(synthetic_site))
    assert result.code == 0
    report = result.json
    assert report["schema"] == "stackpatch/report@1"
    assert report["ok"] is True
    assert report["environment"]["packages"] == {
        "bitsandbytes": "0.49.2",
        "peft": "0.19.1",
        "transformers": "5.5.4",
    }
    p10 = next(p for p in report["patches"] if p["id"] == "P10")
    assert p10["package"] == "transformers"
    assert p10["installed_version"] == "5.5.4"
    assert p10["status"] == "upstreamable"
    assert p10["state"] == "pending"
    assert result.states() == {
        **HISTORICAL,
        "P2": "pending",
        "P10": "pending",
        "P11": "pending",
        "P12": "pending",
        "P13": "pending",
        "P14": "pending",
        "P15": "pending",
        "P16": "pending",
        "P17": "pending",
        "P18": "pending",
        "P19": "pending",
        "P20": "pending",
    }
    assert report["patches"][0]["installed_version"] == "0.49.2"


def test_apply_verify_revert_round_trip(synthetic_site: Path, cli) -> None:
    before = snapshot(synthetic_site)
    site = ("--site-packages", str(synthetic_site))
    assert cli("--verify", "-q", *site).code == 1

    applied = cli("--apply", "--json", *site)
    assert applied.code == 0
    assert applied.states() == {
        **HISTORICAL,
        "P2": "applied",
        "P10": "applied",
        "P11": "applied",
        "P12": "applied",
        "P13": "applied",
        "P14": "applied",
        "P15": "applied",
        "P16": "applied",
        "P17": "applied",
        "P18": "applied",
        "P19": "applied",
        "P20": "applied",
    }
    assert sorted(applied.json["written"]) == EVERY_FILE
    assert "# stackpatch P10" in (synthetic_site / MODELING).read_text()
    assert "**kwargs,  # stackpatch P11" in (synthetic_site / MODULES).read_text()
    assert cli("--verify", *site).code == 0

    reverted = cli("--revert", "--json", *site)
    assert reverted.code == 0
    assert sorted(reverted.json["written"]) == EVERY_FILE
    assert snapshot(synthetic_site) == before  # byte-exact, and no .stackpatch left behind


def test_applying_twice_changes_nothing(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    assert cli("--apply", "-q", *site).code == 0
    once = snapshot(synthetic_site)
    again = cli("--apply", "--json", *site)
    assert again.code == 0
    assert again.json["written"] == []
    assert snapshot(synthetic_site) == once


def test_manifest_records_versions_and_hashes(synthetic_site: Path, cli) -> None:
    original = (synthetic_site / MODELING).read_bytes()
    cli("--apply", "-q", "--site-packages", str(synthetic_site))
    manifest = json.loads((synthetic_site / ".stackpatch" / "manifest.json").read_text())
    assert manifest["format"] == "stackpatch-manifest"
    assert manifest["tool_version"]
    record = next(r for r in manifest["files"] if r["path"] == MODELING)
    assert record["package"] == "transformers" and record["version"] == "5.5.4"
    assert record["patches"] == ["P10", "P18"]
    backup = synthetic_site / ".stackpatch" / "backups" / record["sha256_before"]
    assert backup.read_bytes() == original


def test_diff_shows_the_change_and_writes_nothing(synthetic_site: Path, cli) -> None:
    before = snapshot(synthetic_site)
    result = cli("--diff", "--site-packages", str(synthetic_site))
    assert result.code == 0
    assert f"--- a/{MODELING}" in result.out
    assert "-        raise ValueError(" in result.out
    assert "+        **kwargs,  # stackpatch P11" in result.out
    assert snapshot(synthetic_site) == before


def test_only_and_skip_select_patches(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    assert cli("--apply", "--only", "p10", "-q", *site).code == 0
    assert cli("--verify", "--only", "P10", "-q", *site).code == 0
    verify_all = cli("--verify", "--json", *site)
    assert verify_all.code == 1
    assert verify_all.states() == {
        **HISTORICAL,
        "P2": "pending",
        "P10": "applied",
        "P11": "pending",
        "P12": "pending",
        "P13": "pending",
        "P14": "pending",
        "P15": "pending",
        "P16": "pending",
        "P17": "pending",
        "P18": "pending",
        "P19": "pending",
        "P20": "pending",
    }
    assert (
        cli("--verify", "--skip", "P2,P3,P11,P12,P13,P14,P15,P16,P17,P18,P19,P20", "-q", *site).code
        == 0
    )
    skipped = cli("--check", "--json", "--skip", "P10,P1", *site).json["patches"]
    assert [p["id"] for p in skipped] == [
        "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P11", "P12", "P13", "P14", "P15", "P16",
        "P17", "P18", "P19", "P20",
    ]  # fmt: skip


def test_partial_revert_keeps_other_files(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    original = (synthetic_site / MODULES).read_bytes()
    cli("--apply", "-q", *site)
    assert cli("--revert", "--only", "P3,P11", "-q", *site).code == 0
    assert (synthetic_site / MODULES).read_bytes() == original
    states = cli("--check", "--json", *site).states()
    assert states == {
        **HISTORICAL,
        "P2": "applied",
        "P10": "applied",
        "P11": "pending",
        "P12": "applied",
        "P13": "applied",
        "P14": "applied",
        "P15": "applied",
        "P16": "applied",
        "P17": "applied",
        "P18": "applied",
        "P19": "applied",
        "P20": "applied",
    }


def test_partial_revert_of_a_shared_file_is_refused(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    cli("--apply", "-q", "--include-historical", *site)  # P3 shares modules.py with P11
    before = snapshot(synthetic_site)
    refused = cli("--revert", "--only", "P11", *site)
    assert refused.code == 2
    assert "also carries P3" in refused.err
    assert snapshot(synthetic_site) == before


def test_historical_patches_are_opt_in(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    assert cli("--apply", "-q", *site).code == 0
    assert "stackpatch P1" not in (synthetic_site / FUNCTIONS).read_text()
    included = cli("--apply", "--json", "--include-historical", *site)
    assert included.states()["P1"] == "applied"
    assert "# stackpatch P1" in (synthetic_site / FUNCTIONS).read_text()
    # Naming a historical patch in --only includes it.
    assert cli("--verify", "--json", "--only", "P1", *site).states() == {"P1": "applied"}


def test_not_installed_package(synthetic_site: Path, cli) -> None:
    shutil.rmtree(synthetic_site / "bitsandbytes-0.49.2.dist-info")
    result = cli("--check", "--json", "--site-packages", str(synthetic_site))
    assert result.code == 0
    assert result.states()["P11"] == "not-installed"
    assert result.json["patches"][1]["installed_version"] is None


def test_version_outside_range_is_fixed_upstream(tmp_path: Path, cli) -> None:
    site = tmp_path / "site"
    text = (FIXTURES / "p10" / "basic.before.py").read_text()
    write_distribution(site, "transformers", "5.6.0", {MODELING: text})
    result = cli("--check", "--json", "--only", "P10", "--site-packages", str(site))
    assert result.states() == {"P10": "fixed-upstream"}
    assert "outside" in result.json["patches"][0]["detail"]


def test_upstream_shape_in_range_is_fixed_upstream(tmp_path: Path, cli) -> None:
    site = tmp_path / "site"
    text = (FIXTURES / "p10" / "upstream_fix.fixed.py").read_text()
    write_distribution(site, "transformers", "5.5.4", {MODELING: text})
    result = cli("--check", "--json", "--only", "P10", "--site-packages", str(site))
    assert result.code == 0
    assert result.states() == {"P10": "fixed-upstream"}


def test_target_missing_is_a_problem(tmp_path: Path, cli) -> None:
    site = tmp_path / "site"
    text = (FIXTURES / "p10" / "renamed.missing.py").read_text()
    write_distribution(site, "transformers", "5.5.4", {MODELING: text})
    check = cli("--check", "--only", "P10", "--site-packages", str(site))
    assert check.code == 1
    assert "target-missing" in check.out
    assert cli("--apply", "--only", "P10", "-q", "--site-packages", str(site)).code == 1
    assert (site / MODELING).read_text() == text


def test_missing_target_file_is_target_missing(tmp_path: Path, cli) -> None:
    site = tmp_path / "site"
    write_distribution(site, "transformers", "5.5.1", {"transformers/__init__.py": ""})
    result = cli("--check", "--json", "--only", "P10", "--site-packages", str(site))
    assert result.code == 1
    assert result.states() == {"P10": "target-missing"}
    assert "is not in transformers 5.5.1" in result.json["patches"][0]["detail"]


def test_reinstall_is_drift_and_apply_repairs_it(synthetic_site: Path, cli) -> None:
    site = ("--site-packages", str(synthetic_site))
    pristine = (synthetic_site / MODELING).read_bytes()
    cli("--apply", "-q", *site)
    (synthetic_site / MODELING).write_bytes(pristine)  # what `pip install --force-reinstall` does
    verify = cli("--verify", "--json", *site)
    assert verify.code == 1
    assert verify.states()["P10"] == "drifted"
    assert any("P10" in problem for problem in verify.json["problems"])
    assert cli("--apply", "-q", *site).code == 0
    assert cli("--verify", "-q", *site).code == 0
    cli("--revert", "-q", *site)
    assert (synthetic_site / MODELING).read_bytes() == pristine


def test_bytecode_of_rewritten_files_is_removed(synthetic_site: Path, cli) -> None:
    cache = synthetic_site / "transformers/models/gemma4/__pycache__"
    cache.mkdir()
    stale = cache / "modeling_gemma4.cpython-311.pyc"
    stale.write_bytes(b"old")
    other = cache / "configuration_gemma4.cpython-311.pyc"
    other.write_bytes(b"keep")
    cli("--apply", "-q", "--site-packages", str(synthetic_site))
    assert not stale.exists()
    assert other.exists()


def test_validation_status_prints_the_generated_document(cli) -> None:
    result = cli("--validation-status")
    assert result.code == 0
    assert result.out.startswith("# Validation status")
    assert "| P10 |" in result.out
