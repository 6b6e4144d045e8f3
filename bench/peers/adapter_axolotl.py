"""axolotl 0.21.0: can it train here? The check that writes its rows, on the GPU machine.

    python bench/peers/adapter_axolotl.py --wheel .whl/peers/axolotl-0.21.0-py3-none-any.whl \
        --site /tmp/peers-site/axolotl

axolotl pins a newer stack than the GPU machine has and needs about fifty distributions the
machine lacks (bench/peers/README.md gives their sizes against the carry limit), so it is not
trained. This writes that as its result rows (attn and experts), from what the run finds:
the wheel's own requirements checked against the installed distributions (version conflicts
and missing ones), and the exact error of `import axolotl.cli.train` with the wheel installed
(--no-deps) in its own folder. No torch, no GPU: a few seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import append_line, now_iso

IMPORT_PROBE = "axolotl.cli.train"


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of the wheel that apply here (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    prefix = "Requires-Dist:"
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def check(lines: list[str], installed: dict[str, str]) -> dict[str, list[str]]:
    """Each requirement against `installed` ({normalized name: version}): conflicts and missing."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    conflicts, missing, satisfied = [], [], []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        have = installed.get(name)
        if have is None:
            missing.append(str(requirement))
        elif requirement.specifier and not requirement.specifier.contains(have, prereleases=True):
            conflicts.append(f"{requirement} (installed {have})")
        else:
            satisfied.append(name)
    return {"conflicts": conflicts, "missing": missing, "satisfied": satisfied}


def installed_distributions() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]
    }


def import_error(site: Path) -> str:
    """The last line of `import axolotl.cli.train`'s traceback, or 'imported'."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    completed = subprocess.run(
        [sys.executable, "-c", f"import {IMPORT_PROBE}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if completed.returncode == 0:
        return "imported"
    lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {completed.returncode}, no output"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--site", type=Path, required=True, help="its --target folder")
    args = parser.parse_args()
    results = Path(os.environ.get("PEERS_RESULTS", "peers.jsonl"))
    if not args.wheel.is_file():
        print(f"error: {args.wheel} is missing; run bench/peers/wheels.py", file=sys.stderr)
        return 2
    found = check(requirements(args.wheel), installed_distributions())
    error = import_error(args.site)
    reason = (
        f"not run: axolotl 0.21.0 requires {len(found['conflicts'])} versions this machine does "
        f"not have ({'; '.join(found['conflicts'])}) and {len(found['missing'])} distributions "
        f"it lacks; `import {IMPORT_PROBE}` with the wheel alone: {error}"
    )
    for row in ("attn", "experts"):
        record = {
            "kind": "unavailable",
            "trainer": "axolotl",
            "row": row,
            "time": now_iso(),
            "status": "not_run",
            "error": reason,
            "import_probe": error,
            **found,
        }
        append_line(results, record)
    print(f"[peers] axolotl: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
