"""The engine on real published wheels, installed with `pip install --no-deps --target`.

The oldest supported stack (the one the consumer-llm-patches collection tested) and the
newest releases at the time of writing. Wheels are downloaded once into the cache.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import HISTORICAL, pip_install_target, run_cli_process, wheel, wheel_file

pytestmark = pytest.mark.wheels

OLD_STACK = ("transformers==5.5.4", "peft==0.19.1", "bitsandbytes==0.49.2")
NEW_STACK = ("transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2")
MODELING = "transformers/models/gemma4/modeling_gemma4.py"
MODULES = "bitsandbytes/nn/modules.py"


def assert_identical_to_wheels(site: Path, specs: tuple[str, ...]) -> None:
    """Every file the wheels ship (metadata aside) is byte-identical in `site`."""
    checked = 0
    for spec in specs:
        with zipfile.ZipFile(wheel(spec)) as archive:
            for name in archive.namelist():
                if ".dist-info/" in name or name.endswith("/"):
                    continue
                assert (site / name).read_bytes() == archive.read(name), name
                checked += 1
    assert checked > 50
    assert not (site / ".stackpatch").exists()


def test_old_stack_full_cycle(install, cli) -> None:
    site = install(*OLD_STACK)
    args = ("--site-packages", str(site))

    check = cli("--check", "--json", *args)
    assert check.code == 0
    assert check.states() == {
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
    assert check.json["environment"]["packages"] == {
        "bitsandbytes": "0.49.2",
        "peft": "0.19.1",
        "transformers": "5.5.4",
    }

    apply = cli("--apply", "--json", *args)
    assert apply.code == 0, apply.out
    assert set(apply.states().values()) == {"skipped", "applied"}
    assert cli("--verify", *args).code == 0

    # `pip install --force-reinstall transformers==5.5.4` puts the wheel's file back.
    (site / MODELING).write_bytes(wheel_file("transformers==5.5.4", MODELING))
    verify = cli("--verify", "--json", *args)
    assert verify.code == 1
    assert verify.states() == {
        **HISTORICAL,
        "P2": "applied",
        "P10": "drifted",
        "P11": "applied",
        "P12": "applied",
        "P13": "applied",
        "P14": "applied",
        "P15": "applied",
        "P16": "applied",
        "P17": "applied",
        "P18": "drifted",
        "P19": "applied",
        "P20": "applied",
    }

    assert cli("--apply", "-q", *args).code == 0
    assert cli("--verify", "-q", *args).code == 0
    assert cli("--revert", "-q", *args).code == 0
    assert_identical_to_wheels(site, OLD_STACK)


def test_patched_code_compiles_and_keeps_its_meaning(install, cli) -> None:
    site = install(*OLD_STACK)
    cli("--apply", "-q", "--site-packages", str(site))
    patched = (site / MODELING).read_text()
    assert "is required as a model input when training" not in patched
    assert "# stackpatch P10" in patched
    compile(patched, MODELING, "exec")
    modules = (site / MODULES).read_text()
    assert "        **kwargs,  # stackpatch P11\n" in modules


def test_new_stack_needs_the_peft_bnb_and_experts_patches(install, cli) -> None:
    site = install(*NEW_STACK)
    args = ("--site-packages", str(site))
    check = cli("--check", "--json", *args)
    assert check.code == 0
    assert check.states() == {
        **HISTORICAL,
        "P2": "pending",
        "P10": "fixed-upstream",
        "P11": "fixed-upstream",
        "P12": "pending",
        "P13": "pending",
        "P14": "pending",
        "P15": "pending",
        "P16": "pending",
        "P17": "pending",
        "P18": "fixed-upstream",
        "P19": "pending",
        "P20": "pending",
    }
    assert cli("--verify", "-q", *args).code == 1
    apply = cli("--apply", "--json", *args)
    assert sorted(apply.json["written"]) == [
        "bitsandbytes/autograd/_functions.py",
        "bitsandbytes/backends/cpu/ops.py",
        "peft/tuners/lora/layer.py",
        "peft/tuners/lora/model.py",
        "peft/tuners/tuners_utils.py",
        "transformers/core_model_loading.py",
        "transformers/integrations/bitsandbytes.py",
        "transformers/modeling_utils.py",
        "transformers/quantizers/quantizer_bnb_4bit.py",
    ]
    assert cli("--verify", "-q", *args).code == 0
    assert cli("--revert", "-q", *args).code == 0
    assert_identical_to_wheels(site, NEW_STACK)


def test_fixed_shape_is_recognised_inside_the_range(install, cli, tmp_path: Path) -> None:
    """A backport: 5.5.4's version number with 5.6.0's code is fixed-upstream, not pending."""
    site = install("transformers==5.5.4")
    (site / MODELING).write_bytes(wheel_file("transformers==5.6.0", MODELING))
    check = cli("--check", "--json", "--only", "P10", "--site-packages", str(site))
    assert check.states() == {"P10": "fixed-upstream"}


def test_historical_patch_round_trip(install, cli) -> None:
    """Every patch, historical ones included, on the real oldest stack: applied beside each
    other, the rewritten files still compile, and revert restores the wheels' bytes."""
    site = install(*OLD_STACK)
    args = ("--site-packages", str(site), "--include-historical")
    states = cli("--check", "--json", *args).states()
    assert set(states.values()) == {"pending"}, states
    applied = cli("--apply", "--json", *args)
    assert applied.code == 0
    for relative in applied.json["written"]:
        compile((site / relative).read_text(), relative, "exec")
    assert cli("--verify", "-q", *args).code == 0
    assert cli("--revert", "-q", *args).code == 0
    assert_identical_to_wheels(site, OLD_STACK)


def test_edited_wheel_is_target_missing(install, cli) -> None:
    """A release whose target moved: the engine refuses to guess and exits 1."""
    site = install("transformers==5.5.4")
    modeling = site / MODELING
    modeling.write_text(
        modeling.read_text().replace("def create_causal_mask_mapping(", "def build_mask_mapping(")
    )
    check = cli("--check", "--json", "--only", "P10", "--site-packages", str(site))
    assert check.code == 1
    assert check.states() == {"P10": "target-missing"}
    assert cli("--verify", "-q", "--only", "P10", "--site-packages", str(site)).code == 1
    before = modeling.read_bytes()
    assert cli("--apply", "-q", "--only", "P10", "--site-packages", str(site)).code == 1
    assert modeling.read_bytes() == before


def test_python_option_targets_another_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pip_install_target(purelib, ("transformers==5.5.4",))
    check = run_cli_process("--check", "--json", "--python", str(python))
    assert check.code == 0, check.err
    assert check.json["environment"]["site_packages"] == purelib
    assert check.json["environment"]["packages"] == {"transformers": "5.5.4"}
    assert check.states() == {
        **HISTORICAL,
        "P2": "not-installed",
        "P10": "pending",
        "P11": "not-installed",
        "P12": "not-installed",
        "P13": "pending",
        "P14": "not-installed",
        "P15": "not-installed",
        "P16": "pending",
        "P17": "not-installed",
        "P18": "pending",
        "P19": "pending",
        "P20": "pending",
    }

    assert run_cli_process("--apply", "-q", "--python", str(python)).code == 0
    assert (Path(purelib) / ".stackpatch" / "manifest.json").is_file()
    assert run_cli_process("--verify", "-q", "--python", str(python)).code == 0
    assert run_cli_process("--revert", "-q", "--python", str(python)).code == 0
    assert (Path(purelib) / MODELING).read_bytes() == wheel_file("transformers==5.5.4", MODELING)
