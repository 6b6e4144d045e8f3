"""Locate the target environment and its distributions, never by importing them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from patches import probe
from patches.errors import EnvironmentProblem

STATE_DIR_NAME = ".stackpatch"
PROBE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    location: Path


@dataclass(frozen=True)
class Environment:
    """Where the distributions live, and where stackpatch keeps its state for them."""

    python: str
    python_version: str
    site_packages: Path
    distributions: dict[str, Distribution] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.site_packages / STATE_DIR_NAME

    def distribution(self, name: str) -> Distribution | None:
        return self.distributions.get(name)

    def file(self, relative: str, package: str) -> Path | None:
        dist = self.distributions.get(package)
        return None if dist is None else dist.location / relative

    def manifest_key(self, path: Path) -> str:
        """How the manifest names a file: relative to site-packages when it lies there."""
        try:
            return path.relative_to(self.site_packages).as_posix()
        except ValueError:
            return path.as_posix()

    def versions(self) -> dict[str, str]:
        return {name: d.version for name, d in sorted(self.distributions.items())}


def _from_probe(data: dict) -> Environment:
    distributions = {
        name: Distribution(name, info["version"], Path(info["location"]))
        for name, info in data["distributions"].items()
    }
    locations = {d.location for d in distributions.values()}
    # Keep state beside the packages it describes; fall back to the interpreter's purelib.
    site = locations.pop() if len(locations) == 1 else Path(data["purelib"])
    return Environment(data["python"], data["python_version"], site, distributions)


def _run_probe(python: str, packages: list[str]) -> dict:
    import subprocess  # here, not above: --verify -q on this interpreter never needs it

    try:
        completed = subprocess.run(
            [python, probe.__file__, *packages],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(
            f"--python {python}: cannot run it ({exc.__class__.__name__}: {exc}); "
            "pass the path of a Python 3.9+ interpreter"
        ) from None
    try:
        data = json.loads(completed.stdout)
    except json.JSONDecodeError:
        first = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentProblem(
            f"--python {python} did not answer as a Python 3.9+ interpreter ({first}); "
            "pass the path of the environment's python"
        ) from None
    return data


def locate(
    packages: Iterable[str], python: str | None = None, site_packages: str | None = None
) -> Environment:
    """Describe the current interpreter's environment, another interpreter's, or a directory."""
    names = sorted(set(packages))
    if site_packages is not None:
        directory = Path(site_packages).resolve()
        if not directory.is_dir():
            raise EnvironmentProblem(
                f"--site-packages {site_packages} is not a directory; pass the folder that "
                "holds the installed packages"
            )
        return _from_probe(probe.probe(names, str(directory)))
    if python is None:
        return _from_probe(probe.probe(names))
    if not os.path.exists(python):
        raise EnvironmentProblem(f"--python {python} does not exist; pass an interpreter's path")
    if not os.access(python, os.X_OK) or os.path.isdir(python):
        raise EnvironmentProblem(f"--python {python} is not an executable file")
    return _from_probe(_run_probe(python, names))
