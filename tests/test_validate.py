"""--validate: the overlay mechanics on a synthetic site, with a reproducer that needs no torch."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
from conftest import snapshot

from patches import validate as validate_module
from patches.registry import load_patches

# Reads the module the interpreter would import, as a real reproducer exercises it.
FAKE_REPRODUCER = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.find_spec("transformers.models.gemma4.modeling_gemma4")
    text = open(spec.origin).read()
    env = {"torch": "none", "device": "cpu"}
    if "is required as a model input when training" in text:
        print(json.dumps({"outcome": "bug", "error": "ValueError: required", **env}))
        sys.exit(1)
    print(json.dumps({"outcome": "fine", "error": spec.origin, **env}))
    """
)


@pytest.fixture
def p10_with_fake_reproducer(tmp_path: Path, monkeypatch):
    reproducer = tmp_path / "fake_reproducer.py"
    reproducer.write_text(FAKE_REPRODUCER)
    p10 = next(p for p in load_patches() if p.id == "P10")
    return dataclasses.replace(p10, reproducer=str(reproducer))


def test_unpatched_then_patched_copies(synthetic_site: Path, p10_with_fake_reproducer, cli) -> None:
    # The environment itself is patched: the unpatched copy must still show the bug.
    cli("--apply", "-q", "--site-packages", str(synthetic_site))
    before = snapshot(synthetic_site)
    result = validate_module.validate(p10_with_fake_reproducer, None, str(synthetic_site))
    assert result.before.outcome == "bug"
    assert result.after.outcome == "fine"
    assert "/patched/transformers/" in result.after.error  # it imported the overlay
    assert result.proves_fix
    assert snapshot(synthetic_site) == before  # the environment was never touched


def test_record_says_what_was_run(
    synthetic_site: Path, p10_with_fake_reproducer, tmp_path: Path
) -> None:
    result = validate_module.validate(p10_with_fake_reproducer, None, str(synthetic_site))
    path = validate_module.write_record(result, tmp_path / "records")
    record = json.loads(path.read_text())
    assert path.name == "P10__transformers-5.5.4__cpu.json"
    assert record["packages"] == {
        "bitsandbytes": "0.49.2",
        "peft": "0.19.1",
        "transformers": "5.5.4",
    }
    assert record["before"] == {
        "reproduced": True,
        "outcome": "bug",
        "error": "ValueError: required",
    }
    assert record["after"]["fixed"] is True


def test_out_of_range_release_is_not_applicable(tmp_path: Path, p10_with_fake_reproducer) -> None:
    from conftest import write_distribution

    site = tmp_path / "site"
    text = (Path(__file__).parent / "fixtures/p10/upstream_fix.fixed.py").read_text()
    write_distribution(
        site, "transformers", "5.23.0", {"transformers/models/gemma4/modeling_gemma4.py": text}
    )
    result = validate_module.validate(p10_with_fake_reproducer, None, str(site))
    assert result.before.outcome == "fine"
    assert result.after.outcome == "not-applicable"
    assert "fixed-upstream" in result.after.error
    assert not result.proves_fix


def test_a_reproducer_that_crashes_is_inconclusive(
    synthetic_site: Path, p10_with_fake_reproducer
) -> None:
    Path(p10_with_fake_reproducer.reproducer).write_text("raise ImportError('no torch here')\n")
    result = validate_module.validate(p10_with_fake_reproducer, None, str(synthetic_site))
    assert result.before.outcome == "inconclusive"
    assert "ImportError: no torch here" in result.before.error
    assert not result.proves_fix


# Reads P10's and P12's target files: the bug needs P10 in place, and P12 is what differs.
REQUIRING_REPRODUCER = textwrap.dedent(
    """
    import importlib.util, json, sys
    def text(module):
        return open(importlib.util.find_spec(module).origin).read()
    env = {"torch": "none", "device": "cpu"}
    if "# stackpatch P10" not in text("transformers.models.gemma4.modeling_gemma4"):
        sys.exit("inconclusive: P10 is not in place")
    if "# stackpatch P12" not in text("peft.tuners.lora.model"):
        print(json.dumps({"outcome": "bug", "error": "P12 missing", **env}))
        sys.exit(1)
    print(json.dumps({"outcome": "fine", "error": "both", **env}))
    """
)


@pytest.fixture
def p12_requiring_p10(tmp_path: Path):
    reproducer = tmp_path / "requiring_reproducer.py"
    reproducer.write_text(REQUIRING_REPRODUCER)
    p12 = next(p for p in load_patches() if p.id == "P12")
    return dataclasses.replace(p12, reproducer=str(reproducer), requires=("P10",))


def test_required_patches_are_applied_in_both_runs(
    synthetic_site: Path, p12_requiring_p10, tmp_path: Path
) -> None:
    before = snapshot(synthetic_site)
    result = validate_module.validate(p12_requiring_p10, None, str(synthetic_site))
    assert (result.before.outcome, result.after.outcome) == ("bug", "fine")
    assert snapshot(synthetic_site) == before
    record = json.loads(validate_module.write_record(result, tmp_path).read_text())
    assert record["requires"] == ["P10"]
    assert record["packages"]["transformers"] == "5.5.4"


def test_a_required_patch_that_does_not_apply_makes_both_runs_inconclusive(
    tmp_path: Path, p12_requiring_p10
) -> None:
    from conftest import write_distribution

    site = tmp_path / "site"
    fixed = (Path(__file__).parent / "fixtures/p10/upstream_fix.fixed.py").read_text()
    write_distribution(
        site, "transformers", "5.23.0", {"transformers/models/gemma4/modeling_gemma4.py": fixed}
    )
    peft = (Path(__file__).parent / "fixtures/p12/basic.before.py").read_text()
    write_distribution(site, "peft", "0.21.2", {"peft/tuners/lora/model.py": peft})
    result = validate_module.validate(p12_requiring_p10, None, str(site))
    assert result.before.outcome == result.after.outcome == "inconclusive"
    assert "required patch not applied: P10" in result.before.error
    assert not result.proves_fix


def test_a_requirement_on_an_unknown_patch_fails_when_the_catalog_loads(monkeypatch) -> None:
    from types import SimpleNamespace

    from patches import registry

    p12 = next(p for p in load_patches() if p.id == "P12")
    fake = SimpleNamespace(__name__="fake", PATCH=dataclasses.replace(p12, requires=("P99",)))
    monkeypatch.setattr(registry, "_catalog_modules", lambda: [fake])
    with pytest.raises(TypeError, match="P12 requires unknown patch P99"):
        registry.load_patches()
