"""run.sh's checks and its `setup` line (no torch import; seconds).

python bench/peers/preflight.py wheels MANIFEST WHEEL...   # each file is the manifest's
python bench/peers/preflight.py setup RESULTS MANIFEST     # machine, versions, settings
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import append_line, now_iso, versions


def load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {path}: {exc}; run python3 bench/peers/wheels.py") from None


def check_wheels(manifest_path: Path, wheels: list[Path]) -> list[str]:
    """Problems with `wheels` against the manifest: unknown files and sha256 mismatches."""
    from wheels import sha256_file

    listed = {e["file"]: e for e in load_manifest(manifest_path)["wheels"]}
    problems = []
    for wheel in wheels:
        entry = listed.get(wheel.name)
        if entry is None:
            problems.append(f"{wheel.name}: not in {manifest_path}")
        elif sha256_file(wheel) != entry["sha256"]:
            problems.append(f"{wheel.name}: sha256 differs from {manifest_path}")
    return problems


def gpu() -> str:
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no nvidia-smi ({exc.__class__.__name__})"
    return completed.stdout.strip() or completed.stderr.strip()


def setup_line(results: Path, manifest_path: Path) -> dict:
    manifest = load_manifest(manifest_path) if manifest_path.is_file() else {"wheels": []}
    record = {
        "kind": "setup",
        "time": now_iso(),
        "gpu": gpu(),
        "python": platform.python_version(),
        "machine_versions": versions(),
        "wheels": [
            {k: e[k] for k in ("file", "sha256", "bytes", "repacked", "removed", "official_sha256")}
            for e in manifest["wheels"]
        ],
        "settings": {
            key: os.environ.get(key)
            for key in ("LENGTHS", "STEPS", "CAP_GIB", "CKPT", "DATA", "BUDGET_S", "DRY_RUN")
        },
    }
    append_line(results, record)
    return record


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "wheels":
        problems = check_wheels(Path(argv[1]), [Path(a) for a in argv[2:]])
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if len(argv) == 3 and argv[0] == "setup":
        record = setup_line(Path(argv[1]), Path(argv[2]))
        print(f"[peers] setup: {record['gpu']}; {record['machine_versions']}")
        return 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
