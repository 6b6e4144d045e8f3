"""Find every patch module in `patches.catalog`; adding a patch needs no edit here."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import TypeVar

from patches import catalog
from patches.errors import UsageError
from patches.model import Applicability, Patch

# A Patch, or the PatchInfo the quick verify reads without importing the catalog.
AnyPatch = TypeVar("AnyPatch", bound=Applicability)


def _catalog_modules() -> Iterable[ModuleType]:
    for info in sorted(pkgutil.iter_modules(catalog.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{catalog.__name__}.{info.name}")


def load_patches() -> tuple[Patch, ...]:
    """All patches in the catalog, ordered by their number."""
    patches: dict[str, Patch] = {}
    for module in _catalog_modules():
        patch = getattr(module, "PATCH", None)
        if not isinstance(patch, Patch):
            raise TypeError(f"{module.__name__} defines no PATCH")
        if patch.id in patches:
            raise TypeError(f"{module.__name__} reuses patch id {patch.id}")
        patches[patch.id] = patch
    for patch in patches.values():
        unknown = [i for i in patch.requires if i not in patches]
        if unknown:
            raise TypeError(f"{patch.id} requires unknown patch {', '.join(unknown)}")
    return tuple(sorted(patches.values(), key=lambda p: p.number))


def parse_id_list(text: str) -> list[str]:
    return [part.strip().upper() for part in text.split(",") if part.strip()]


def select(
    patches: Sequence[AnyPatch], only: Sequence[str] = (), skip: Sequence[str] = ()
) -> tuple[AnyPatch, ...]:
    """The patches named by --only (all when empty), less those named by --skip."""
    known = {p.id for p in patches}
    unknown = sorted({*only, *skip} - known, key=lambda i: (len(i), i))
    if unknown:
        raise UsageError(
            f"unknown patch id {', '.join(unknown)}; known ids: {', '.join(p.id for p in patches)}"
        )
    chosen = [p for p in patches if not only or p.id in only]
    return tuple(p for p in chosen if p.id not in skip)


def choose(
    patches: Sequence[AnyPatch], only: str, skip: str, include_historical: bool
) -> tuple[tuple[AnyPatch, ...], bool]:
    """`--only`, `--skip` and `--include-historical`: the patches to work on, and whether
    historical ones count (naming one in --only includes it)."""
    named = parse_id_list(only)
    chosen = select(patches, named, parse_id_list(skip))
    if not chosen:
        raise UsageError("--only/--skip left no patch to work on")
    return chosen, include_historical or any(not p.recommended for p in chosen if p.id in named)
