"""Start a command, or say in one line which dependency this interpreter lacks.

Standard library only: it runs before stackpatch's dependencies are known to be importable.
"""

from __future__ import annotations

import importlib
import sys

ELSEWHERE = "run stackpatch from an environment that has them and point it here with --python"


def missing_dependency(missing: ModuleNotFoundError, where: str = ELSEWHERE) -> int:
    """Say which dependency this interpreter lacks and what to do; the exit code (2)."""
    print(
        f"error: stackpatch needs {missing.name} in this interpreter ({sys.executable}): "
        f"pip install -r requirements.txt, or {where}",
        file=sys.stderr,
    )
    return 2


def launch(module: str, where: str = ELSEWHERE) -> int:
    """Run `module.main()`; a missing dependency is an environment error (exit 2)."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as missing:
        return missing_dependency(missing, where)
    return main()
