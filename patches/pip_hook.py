"""pip, then re-apply: pip has no post-install hook, so an upgrade silently drops patches.

`python pip_and_patch.py [--python PATH] install -U transformers` runs pip with the target
interpreter, and when pip changed the environment, `--apply` against that same environment.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

# commands: --apply needs libcst and rich; importing it here stops a run without them before pip.
from patches import cli, commands  # noqa: F401

CHANGING_COMMANDS = ("install", "uninstall")


def split_python(argv: Sequence[str]) -> tuple[str, list[str]]:
    if argv[:1] == ["--python"] and len(argv) >= 2:
        return argv[1], list(argv[2:])
    return sys.executable, list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    python, pip_args = split_python(sys.argv[1:] if argv is None else argv)
    if not pip_args:
        print("usage: pip_and_patch.py [--python PATH] PIP-ARGS...", file=sys.stderr)
        return 2
    try:
        code = subprocess.run([python, "-m", "pip", *pip_args], check=False).returncode
    except OSError as exc:
        print(f"error: --python {python}: cannot run it ({exc.strerror})", file=sys.stderr)
        return 2
    if code != 0 or pip_args[0] not in CHANGING_COMMANDS:
        return code
    return cli.main(["--apply", "--python", python])
