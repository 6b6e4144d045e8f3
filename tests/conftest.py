"""Shared fixtures: synthetic site-packages for fast engine tests, real wheels for the rest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from patches.cli import main
from patches.model import Patch, Target
from patches.registry import load_patches
from patches.releases import cache_dir, download_wheel

# tests/torch, tests/patched_bnb and tests/triton need torch (and Triton):
# tests/test_torch_suite.py runs them inside the stack venvs.
collect_ignore = ["torch", "patched_bnb", "triton"]

FIXTURES = Path(__file__).parent / "fixtures"
WHEEL_CACHE = cache_dir() / "wheels"  # where download_wheel keeps them

# The synthetic environment: every target file of the registry at its real path, holding the
# fixtures' `basic.before.py` shape (a file several patches target concatenates theirs), in
# one release per package that is inside every patch's range.
SYNTHETIC_VERSIONS = {"transformers": "5.5.4", "bitsandbytes": "0.49.2", "peft": "0.19.1"}
# The historical patches: skipped unless asked for, whatever the environment holds.
HISTORICAL = {p.id: "skipped" for p in load_patches() if not p.recommended}


def fixture_dir(patch: Patch, target: Target) -> str:
    """tests/fixtures/pNN, or pNN/<file stem> for a patch with several target files."""
    base = f"p{patch.number}"
    return base if len(patch.targets) == 1 else f"{base}/{Path(target.path).stem}"


def synthetic_files() -> dict[str, dict[str, list[str]]]:
    files: dict[str, dict[str, list[str]]] = {}
    for patch in load_patches():
        for target in patch.targets:
            paths = files.setdefault(patch.package, {})
            paths.setdefault(target.path, []).append(fixture_dir(patch, target))
    return files


def write_distribution(site: Path, name: str, version: str, files: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for relative, text in files.items():
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def write_synthetic_site(site: Path) -> Path:
    """Install the synthetic distributions into `site` (any site-packages directory)."""
    for name, files in synthetic_files().items():
        version = SYNTHETIC_VERSIONS[name]
        texts = {
            rel: "\n\n".join((FIXTURES / d / "basic.before.py").read_text() for d in dirs)
            for rel, dirs in files.items()
        }
        write_distribution(site, name, version, texts)
    return site


@pytest.fixture
def synthetic_site(tmp_path: Path) -> Path:
    return write_synthetic_site(tmp_path / "site-packages")


def snapshot(site: Path) -> dict[str, bytes]:
    """Every file below `site` (the state folder included) and its bytes."""
    return {
        p.relative_to(site).as_posix(): p.read_bytes()
        for p in sorted(site.rglob("*"))
        if p.is_file()
    }


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    def states(self) -> dict[str, str]:
        return {p["id"]: p["state"] for p in self.json["patches"]}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_cli_process(*argv: str, python: str = sys.executable, **kwargs) -> CliResult:
    """Run apply_patches.py in a fresh interpreter, as a user would."""
    root = Path(__file__).resolve().parent.parent
    completed = subprocess.run(
        [python, str(root / "apply_patches.py"), *argv],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
        **kwargs,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def wheel(spec: str) -> Path:
    """A cached wheel for `name==version`, downloaded once without dependencies."""
    return download_wheel(Requirement(spec))


def wheel_file(spec: str, relative: str) -> bytes:
    with zipfile.ZipFile(wheel(spec)) as archive:
        return archive.read(relative)


def pip_install_target(target: Path | str, specs: tuple[str, ...]) -> None:
    """`pip install --no-deps --target`: the real files of cached wheels, without torch."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--no-index",
            "--target",
            str(target),
            *(str(wheel(s)) for s in specs),
        ],
        check=True,
    )


@pytest.fixture(scope="session")
def pristine_trees(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, ...]], Path]:
    """One untouched `pip install --target` tree per set of wheels, made once per session."""
    root = tmp_path_factory.mktemp("pristine")
    made: dict[tuple[str, ...], Path] = {}

    def tree(specs: tuple[str, ...]) -> Path:
        key = tuple(sorted(specs))
        if key not in made:
            made[key] = root / "-".join(s.replace("==", "_") for s in key)
            pip_install_target(made[key], key)
        return made[key]

    return tree


@pytest.fixture
def install(pristine_trees, tmp_path: Path) -> Callable[..., Path]:
    """`install("transformers==5.5.4", ...)`: a fresh copy of a real `pip install --target` tree."""

    def make(*specs: str) -> Path:
        site = tmp_path / "site-packages"
        shutil.copytree(pristine_trees(specs), site, symlinks=True)
        return site

    return make


VENV_CACHE = Path(
    os.environ.get("STACKPATCH_VENV_CACHE", Path.home() / ".cache" / "stackpatch" / "venvs")
)
# Real stacks with torch 2.13.0 CPU, pinned on the same pip line so pip never pulls a
# multi-GB CUDA build: the oldest releases supported and the newest at the time of writing.
STACKS = {
    "oldest": (
        "torch==2.13.0",
        "transformers==5.5.4",
        "peft==0.19.1",
        "bitsandbytes==0.49.2",
        "accelerate==1.13.0",
    ),
    "newest": (
        "torch==2.13.0",
        "transformers==5.23.0",
        "peft==0.21.2",
        "bitsandbytes==0.50.2",
        "accelerate==1.15.0",
    ),
}


def stack_python(name: str, extra: tuple[str, ...] = ()) -> Path:
    """The interpreter of a cached venv holding the stack (built on first use, 1-2 min)."""
    venv = VENV_CACHE / "-".join(s.replace("==", "") for s in STACKS[name])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = venv / ".complete"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([*pip, *STACKS[name]], check=True)
        done.write_text("\n".join(STACKS[name]))
    for package in extra:
        module = package.partition("==")[0]
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
        if probe.returncode:
            subprocess.run([*pip, package], check=True)
    return python


OWN_COPIES = ("transformers", "peft", "bitsandbytes")


def layered_env(stack: str, dest: Path, without: tuple[str, ...] = ()) -> Path:
    """A venv that sees a cached stack's packages through a .pth file but owns copies of
    transformers, peft and bitsandbytes, so stackpatch can patch it without touching the cache.
    `without` names distributions it must not see (e.g. libcst and rich: a training
    environment without stackpatch's dependencies). Returns its interpreter."""
    base = stack_python(stack, extra=("libcst", "rich"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    (site,) = dest.glob("lib/python*/site-packages")
    (base_site,) = base.parent.parent.glob("lib/python*/site-packages")
    seen = base_site
    if without:
        # The stack's site-packages less those distributions: a folder of links to the rest.
        seen = dest / "stack-view"
        seen.mkdir()
        for entry in base_site.iterdir():
            dist_info = entry.suffix == ".dist-info"
            name = entry.name.partition("-")[0] if dist_info else entry.name.removesuffix(".py")
            if name not in without:
                (seen / entry.name).symlink_to(entry)
    (site / "stack.pth").write_text(f"{seen}\n")
    for name in OWN_COPIES:
        shutil.copytree(base_site / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        (info,) = base_site.glob(f"{name}-*.dist-info")
        shutil.copytree(info, site / info.name)
    return dest / "bin" / "python"
