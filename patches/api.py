"""stackpatch as a library: what a training script asks before it starts."""

from __future__ import annotations

from collections.abc import Collection

from patches import quick_verify
from patches.declared import read_catalog


def verify_problems(ids: Collection[str] | None = None, python: str | None = None) -> list[str]:
    """`--verify` for the given patch ids (default: all), as problem lines; empty means ready.

    Reads only the manifest, the installed versions and the target files' hashes, like
    `--verify -q`, and imports neither libcst nor rich (see patches/quick_verify.py): a
    training environment needs only the repository on its path.
    """
    chosen = [p for p in read_catalog() if ids is None or p.id in ids]
    return quick_verify.problems(chosen, python)
