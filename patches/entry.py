"""Start a command, or say in one line which dependency this interpreter lacks.

Standard library only: it runs before stackpatch's dependencies are known to be importable.
"""

from __future__ import annotations

import importlib
import sys


def launch(module: str, where: str) -> int:
    """Run `module.main()`; a missing dependency is an environment error (exit 2)."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as missing:
        print(
            f"error: stackpatch needs {missing.name} in this interpreter ({sys.executable}): "
            f"pip install -r requirements.txt, or {where}",
            file=sys.stderr,
        )
        return 2
    return main()
