"""The base every patch transform derives from, and the shape classification built on it.

A transform is a libcst codemod in the style of libcst's own commands: it locates its
target with matchers, rewrites it in `leave_*` methods and counts what it rewrote. On top
of that it can recognise the already-patched shape (marker comments naming the patch) and,
where one exists, the shape upstream shipped as its own fix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, SkipFile, VisitorBasedCodemodCommand

from patches.model import MARKER_PREFIX, marker_pattern

Definition = TypeVar("Definition", cst.ClassDef, cst.FunctionDef)


class ShapeKind(str, enum.Enum):
    ORIGINAL = "original"
    PATCHED = "patched"
    FIXED_UPSTREAM = "fixed-upstream"
    MISSING = "missing"


@dataclass(frozen=True)
class Shape:
    kind: ShapeKind
    new_module: cst.Module | None = None
    detail: str = ""


class PatchTransform(VisitorBasedCodemodCommand):
    """A codemod that applies one patch to one file.

    Subclasses rewrite in `leave_*` methods, call `self.count_rewrite()` for each site
    they change, and mark every changed line with `self.marker()`.
    """

    DESCRIPTION: ClassVar[str] = ""
    # How many places the transform must rewrite; fewer means the code has moved on.
    SITES: ClassVar[int] = 1
    # The class/function names enclosing the target, outermost first, e.g. ("Int8Params",
    # "__new__"). Definitions off this path are not descended into: that keeps a transform
    # over a 5,000-line modeling file fast. Empty means the whole module is visited.
    SCOPE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: CodemodContext, patch_id: str) -> None:
        super().__init__(context)
        self.patch_id = patch_id
        self.rewritten = 0
        self._enclosing: list[str] = []

    def _enter(self, name: str) -> bool:
        depth = len(self._enclosing)
        self._enclosing.append(name)
        return not self.SCOPE or (depth < len(self.SCOPE) and self.SCOPE[depth] == name)

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        return self._enter(node.name.value)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return self._enter(node.name.value)

    def leave_ClassDef(
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        return self._leave_definition(original_node, updated_node)

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        return self._leave_definition(original_node, updated_node)

    def _leave_definition(self, original_node: Definition, updated_node: Definition) -> Definition:
        at_scope = bool(self.SCOPE) and self.within_scope()
        self._enclosing.pop()
        return self.leave_scope(original_node, updated_node) if at_scope else updated_node

    def leave_scope(self, original_node: Definition, updated_node: Definition) -> Definition:
        """Rewrite the definition SCOPE names; called once per such definition."""
        return updated_node

    def within_scope(self) -> bool:
        """True while visiting the innermost definition named by SCOPE."""
        return tuple(self._enclosing) == self.SCOPE

    def count_rewrite(self) -> None:
        self.rewritten += 1

    def marker(self, note: str = "") -> cst.Comment:
        text = f"{MARKER_PREFIX} {self.patch_id}"
        return cst.Comment(f"{text}: {note}" if note else text)

    def marked_comment(self, comment: cst.Comment, note: str = "") -> cst.Comment:
        """`comment` with the marker after it."""
        return cst.Comment(f"{comment.value}  {self.marker(note).value}")

    def trailing_marker(
        self, note: str = "", existing: cst.TrailingWhitespace | None = None
    ) -> cst.TrailingWhitespace:
        """A line end carrying the marker, after any comment the line already had."""
        if existing is not None and existing.comment is not None:
            return existing.with_changes(comment=self.marked_comment(existing.comment, note))
        return cst.TrailingWhitespace(
            whitespace=cst.SimpleWhitespace("  "), comment=self.marker(note)
        )

    def with_value(
        self, line: cst.SimpleStatementLine, value: cst.BaseExpression, note: str = ""
    ) -> cst.SimpleStatementLine:
        """`line`, one assignment (`=` or an augmented one), with `value` on its right-hand
        side and the marker at its end; counts the rewrite."""
        self.count_rewrite()
        statement = line.body[0]
        if not isinstance(statement, (cst.Assign, cst.AugAssign)):
            raise TypeError(f"{self.patch_id}: expected an assignment, got {statement}")
        return line.with_changes(
            body=[statement.with_changes(value=value)],
            trailing_whitespace=self.trailing_marker(note, existing=line.trailing_whitespace),
        )

    def marker_line(self, note: str = "", indent: bool = True) -> cst.EmptyLine:
        return cst.EmptyLine(indent=indent, comment=self.marker(note))

    def marked_statement(self, source: str) -> cst.BaseStatement:
        """Parse one statement of new code with every line of it marked."""
        return cst.parse_statement(source).visit(_MarkEveryLine(self))

    def insert_beside(
        self,
        block: cst.IndentedBlock,
        anchor: m.BaseMatcherNode,
        source: str,
        before: bool,
    ) -> cst.IndentedBlock:
        """Put marked new code before or after each statement of `block` matching `anchor`,
        unless the neighbour on that side already carries this patch's marker (applied)."""
        statements = list(block.body)
        body: list[cst.BaseStatement] = []
        for index, statement in enumerate(statements):
            side = index - 1 if before else index + 1
            neighbour = statements[side] if 0 <= side < len(statements) else None
            found = m.matches(statement, anchor) and not self.carries_marker(neighbour)
            if found and before:
                body.append(self.marked_statement(source))
            body.append(statement)
            if found and not before:
                body.append(self.marked_statement(source))
            if found:
                self.count_rewrite()
        return block.with_changes(body=body)

    def with_injected(self, module: cst.Module, *sources: Path) -> cst.Module:
        """`module` with the code of `sources` (repository modules) appended, once every other
        site has been rewritten: they call it. Counts as the last site."""
        if self.rewritten != self.SITES - 1:
            return module
        self.count_rewrite()
        return module.with_changes(body=[*module.body, *injected_statements(self, *sources)])

    def carries_marker(self, node: cst.CSTNode | None) -> bool:
        """True when `node` holds this patch's marker: the site was rewritten already."""
        if node is None:
            return False
        pattern = marker_pattern(self.patch_id)
        return bool(m.findall(node, m.Comment(value=m.MatchIfTrue(pattern.search))))

    def scope_nodes(self, module: cst.Module) -> list[cst.CSTNode]:
        """The definitions SCOPE names (the module itself when SCOPE is empty)."""
        if not self.SCOPE:
            return [module]
        finder = _ScopeFinder(self.SCOPE)
        module.visit(finder)
        return finder.found

    def is_patched(self, module: cst.Module) -> bool:
        """True when this patch's markers are present: someone applied it already."""
        return any(self.carries_marker(node) for node in self.scope_nodes(module))

    def is_fixed_upstream(self, module: cst.Module) -> bool:
        """True when the module has the shape upstream shipped as its own fix."""
        return False

    def transform_module(self, tree: cst.Module) -> cst.Module:
        # No transform reads metadata, so skip the defensive deep copy a wrapper would make.
        return self.transform_module_impl(tree)

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        result = super().transform_module_impl(tree)
        if self.rewritten == 0:
            raise SkipFile(f"{self.patch_id}: target not found")
        return result


class _ScopeFinder(cst.CSTVisitor):
    def __init__(self, scope: tuple[str, ...]) -> None:
        self.scope = scope
        self.path: list[str] = []
        self.found: list[cst.CSTNode] = []

    def _enter(self, node: cst.ClassDef | cst.FunctionDef) -> bool:
        depth = len(self.path)
        self.path.append(node.name.value)
        if tuple(self.path) == self.scope:
            self.found.append(node)
            return False
        return depth < len(self.scope) and self.scope[depth] == node.name.value

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        return self._enter(node)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return self._enter(node)

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.path.pop()

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self.path.pop()


def parse(source: str) -> cst.Module | str:
    """The module, or a one-line reason libcst could not parse it."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        return f"libcst cannot parse the file: {exc.message}"


def classify(transform_cls: type[PatchTransform], patch_id: str, module: cst.Module) -> Shape:
    """Say which shape `module` has for this transform, with the rewritten module if any."""
    transform = transform_cls(CodemodContext(), patch_id)
    try:
        rewritten = transform.transform_module(module)
    except SkipFile:
        rewritten = None
    if rewritten is not None and transform.rewritten == transform.SITES:
        return Shape(ShapeKind.ORIGINAL, new_module=rewritten)
    if rewritten is not None:
        return Shape(
            ShapeKind.MISSING,
            detail=f"found {transform.rewritten} of {transform.SITES} target sites",
        )
    if transform.is_patched(module):
        return Shape(ShapeKind.PATCHED)
    if transform.is_fixed_upstream(module):
        return Shape(ShapeKind.FIXED_UPSTREAM, detail="upstream's fix is present")
    return Shape(ShapeKind.MISSING, detail="target shape not found")


class _MarkEveryLine(cst.CSTTransformer):
    """Put a patch's marker at the end of every statement line, block header and comment."""

    def __init__(self, transform: PatchTransform) -> None:
        self.transform = transform

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        trailing = self.transform.trailing_marker(existing=updated_node.trailing_whitespace)
        return updated_node.with_changes(trailing_whitespace=trailing)

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        return updated_node.with_changes(
            header=self.transform.trailing_marker(existing=updated_node.header)
        )

    def leave_Decorator(
        self, original_node: cst.Decorator, updated_node: cst.Decorator
    ) -> cst.Decorator:
        trailing = self.transform.trailing_marker(existing=updated_node.trailing_whitespace)
        return updated_node.with_changes(trailing_whitespace=trailing)

    def leave_EmptyLine(
        self, original_node: cst.EmptyLine, updated_node: cst.EmptyLine
    ) -> cst.EmptyLine:
        comment = updated_node.comment
        if comment is None or self.transform.carries_marker(updated_node):
            return updated_node
        return updated_node.with_changes(comment=self.transform.marked_comment(comment))


_REPO_IMPORT = m.ImportFrom(module=m.Attribute(value=m.Attribute(value=m.Name("patches"))))
_FUTURE_IMPORT = m.ImportFrom(module=m.Name("__future__"))


def injected_statements(transform: PatchTransform, *sources: Path) -> list[cst.BaseStatement]:
    """The statements of real repository modules, ready to insert into a target file.

    Module docstrings, `from __future__` and imports of other `patches.*` modules (which are
    injected alongside) are dropped; every line is marked with the patch id.
    """
    statements: list[cst.BaseStatement] = []
    for source in sources:
        body = list(cst.parse_module(source.read_text(encoding="utf-8")).body)
        if body and m.matches(body[0], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())])):
            body = body[1:]
        kept = [
            s
            for s in body
            if not m.matches(s, m.SimpleStatementLine(body=[_REPO_IMPORT | _FUTURE_IMPORT]))
        ]
        marker = transform.marker_line(f"code from stackpatch's {source.name}", indent=False)
        kept[0] = kept[0].with_changes(leading_lines=[cst.EmptyLine(), marker])
        statements += [s.visit(_MarkEveryLine(transform)) for s in kept]
    return statements
