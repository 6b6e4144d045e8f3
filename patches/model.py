"""The vocabulary of stackpatch: patches, their targets, and the states a patch can be in."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patches.transform import PatchTransform

PATCH_ID_PATTERN = re.compile(r"^P[1-9][0-9]*$")
# Every line a patch changes carries `# stackpatch PNN`: how a file shows it was patched.
MARKER_PREFIX = "# stackpatch"
ANY_MARKER = re.compile(r"#\s*stackpatch\s+P[0-9]+\b")


def marker_pattern(patch_id: str) -> re.Pattern[str]:
    return re.compile(rf"#\s*stackpatch\s+{re.escape(patch_id)}\b")


class Status(str, enum.Enum):
    """How well a patch is established, as its author claims it."""

    CONFIRMED = "confirmed"
    UPSTREAMABLE = "upstreamable"
    HISTORICAL = "historical"


class State(str, enum.Enum):
    """Where a patch stands in one environment."""

    APPLIED = "applied"
    PENDING = "pending"
    FIXED_UPSTREAM = "fixed-upstream"
    TARGET_MISSING = "target-missing"
    NOT_INSTALLED = "not-installed"
    DRIFTED = "drifted"
    SKIPPED = "skipped"


# The states that make `--check` and `--verify` exit 1.
CHECK_PROBLEMS = (State.TARGET_MISSING, State.DRIFTED)
VERIFY_PROBLEMS = (State.PENDING, *CHECK_PROBLEMS)


class Applicability:
    """Which environments a patch concerns: its release range and whether it is on by default.

    Shared by `Patch` and by `PatchInfo`, the part of it the quick verify reads."""

    id: str
    affected: str
    status: Status

    @property
    def number(self) -> int:
        return int(self.id[1:])

    @property
    def recommended(self) -> bool:
        return self.status is not Status.HISTORICAL

    def affects(self, version: str) -> bool:
        # Imported here: a quick --verify that finds every patch applied never compares
        # versions, and packaging's import is a tenth of its time.
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return SpecifierSet(self.affected).contains(Version(version), prereleases=True)


@dataclass(frozen=True)
class PatchInfo(Applicability):
    """What `--verify` needs to know of a patch, without its transforms (and so without
    libcst): `patches.declared` reads it from the catalog's source."""

    id: str
    package: str
    affected: str
    status: Status
    # The target files, relative to site-packages, in the patch's order.
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One file a patch rewrites, and the transform that rewrites it.

    `path` is relative to the site-packages directory that holds the distribution,
    e.g. ``transformers/models/gemma4/modeling_gemma4.py``.
    """

    path: str
    transform: type[PatchTransform]


@dataclass(frozen=True)
class Patch(Applicability):
    """A declarative description of one fix to an installed distribution."""

    id: str
    slug: str
    title: str
    package: str
    # A packaging specifier for the releases that have the bug, e.g. ">=5.5.0,<5.6.0".
    affected: str
    status: Status
    targets: tuple[Target, ...]
    rationale: str
    references: tuple[str, ...] = ()
    reproducer: str | None = None
    historical_reason: str | None = None
    # Patches whose effect the bug needs (e.g. P13's packed experts): --validate applies them
    # to its copies of their packages in both runs, so only this patch differs between them.
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from packaging.specifiers import SpecifierSet

        for patch_id in (self.id, *self.requires):
            if not PATCH_ID_PATTERN.match(patch_id):
                raise ValueError(f"patch id {patch_id!r} must look like P12")
        SpecifierSet(self.affected)  # raises InvalidSpecifier on a typo
        if not self.targets:
            raise ValueError(f"patch {self.id} has no targets")
        if self.status is Status.HISTORICAL and not self.historical_reason:
            raise ValueError(f"historical patch {self.id} must say why it is historical")

    @property
    def info(self) -> PatchInfo:
        return PatchInfo(
            self.id, self.package, self.affected, self.status, tuple(t.path for t in self.targets)
        )


@dataclass(frozen=True)
class Assessment:
    """The state of one patch in one environment, with what the engine learned on the way."""

    patch: Patch
    state: State
    installed_version: str | None
    detail: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_problem_for_verify(self) -> bool:
        # Historical patches only reach this point when the user asked for them.
        return self.state in VERIFY_PROBLEMS

    @property
    def is_problem_for_check(self) -> bool:
        return self.state in CHECK_PROBLEMS
