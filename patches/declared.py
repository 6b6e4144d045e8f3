"""What each patch declares, read from the catalog's source without importing it.

A catalog module (`patches/catalog/pNN_*.py`) imports libcst for its transform, but `--verify`
needs only its `PATCH`'s id, package, affected range, status and target paths. Those are
written as literals in `PATCH = Patch(...)` (strings, `Status.X`, `Target("path", Transform)`),
so `ast` reads them from the same file the registry imports: one source of truth, no derived
table. tests/test_quick_verify.py proves that what is read here equals the imported registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

from patches.errors import StackpatchError
from patches.model import PatchInfo, Status

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"


class UndeclaredPatch(StackpatchError):
    """A catalog module whose PATCH cannot be read without running it."""


def read_catalog(directory: Path = CATALOG_DIR) -> tuple[PatchInfo, ...]:
    """Every catalog module's PATCH, ordered by number, as the registry orders them."""
    infos = [_read_module(path) for path in sorted(directory.glob("p*.py"))]
    return tuple(sorted(infos, key=lambda info: info.number))


def _read_module(path: Path) -> PatchInfo:
    source = path.read_bytes()
    # Parsing from `PATCH = ` on is ten times faster than the whole module (the transform
    # above it is most of the file); the whole module is read when that is not enough, e.g.
    # when a field names a constant defined above.
    start = source.find(b"\nPATCH = ")
    if start >= 0:
        try:
            return _read_statements(path, source[start:])
        except (SyntaxError, UndeclaredPatch):
            pass
    return _read_statements(path, source)


def _read_statements(path: Path, source: bytes) -> PatchInfo:
    tree = ast.parse(source, filename=str(path))
    constants: dict[str, ast.expr] = {}
    call: ast.expr | None = None
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                constants[target.id] = statement.value
                if target.id == "PATCH":
                    call = statement.value
    if not (isinstance(call, ast.Call) and _is_call_of(call, "Patch") and not call.args):
        raise UndeclaredPatch(f"{path}: no `PATCH = Patch(...)` with keyword arguments")
    reader = _Reader(path, constants)
    fields = {keyword.arg: keyword.value for keyword in call.keywords}
    return PatchInfo(
        id=reader.string(fields, "id"),
        package=reader.string(fields, "package"),
        affected=reader.string(fields, "affected"),
        status=reader.status(fields),
        paths=reader.target_paths(fields),
    )


def _is_call_of(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


class _Reader:
    """Evaluates the few literal forms a PATCH's fields may take, naming what it cannot."""

    def __init__(self, path: Path, constants: dict[str, ast.expr]) -> None:
        self.path = path
        self.constants = constants

    def _refuse(self, field: str, node: ast.expr | None) -> UndeclaredPatch:
        shown = "nothing" if node is None else ast.unparse(node)[:80]
        return UndeclaredPatch(
            f"{self.path}: PATCH's {field} must be a literal the quick verify can read "
            f"without importing the module (found {shown}); see README, 'Adding a patch'"
        )

    def _resolve(self, node: ast.expr | None) -> ast.expr | None:
        # A module-level name bound to a literal, e.g. `FILE = "transformers/..."`.
        seen = 0
        while isinstance(node, ast.Name) and node.id in self.constants and seen < 10:
            node, seen = self.constants[node.id], seen + 1
        return node

    def _string(self, field: str, node: ast.expr | None) -> str:
        value = self._resolve(node)
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
        raise self._refuse(field, node)

    def string(self, fields: dict[str | None, ast.expr], field: str) -> str:
        return self._string(field, fields.get(field))

    def status(self, fields: dict[str | None, ast.expr]) -> Status:
        node = self._resolve(fields.get("status"))
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "Status"
            and node.attr in Status.__members__
        ):
            return Status[node.attr]
        raise self._refuse("status", fields.get("status"))

    def target_paths(self, fields: dict[str | None, ast.expr]) -> tuple[str, ...]:
        node = self._resolve(fields.get("targets"))
        if not isinstance(node, (ast.Tuple, ast.List)):
            raise self._refuse("targets", fields.get("targets"))
        paths = []
        for element in node.elts:
            target = self._resolve(element)
            if not (isinstance(target, ast.Call) and _is_call_of(target, "Target")):
                raise self._refuse("targets", element)
            keywords = {k.arg: k.value for k in target.keywords}
            path = target.args[0] if target.args else keywords.get("path")
            paths.append(self._string("target path", path))
        return tuple(paths)
