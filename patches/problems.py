"""Problem lines: why `--check` or `--verify` is not ok, worded once for the full engine and
the quick verify. Imports neither libcst nor rich, so a training environment can use it."""

from __future__ import annotations

from collections.abc import Sequence

from patches.manifest import Manifest
from patches.model import ANY_MARKER, Assessment, State

ADVICE = {
    State.PENDING: "not applied; run `python apply_patches.py --apply`",
    State.TARGET_MISSING: "the code no longer matches the patch; do not rely on it here",
    State.DRIFTED: "patched file changed since apply",
}


def problem_line(
    patch_id: str, package: str, version: str | None, state: State | str, advice: str, detail: str
) -> str:
    """`P10 [transformers 5.5.4] drifted: patched file changed since apply (detail)`."""
    label = state.value if isinstance(state, State) else state
    installed = f" {version}" if version else ""
    said = f" ({detail})" if detail else ""
    return f"{patch_id} [{package}{installed}] {label}: {advice}{said}"


def assessment_line(a: Assessment) -> str:
    return problem_line(
        a.patch.id, a.patch.package, a.installed_version, a.state, ADVICE[a.state], a.detail
    )


def problems_for(command: str, assessments: Sequence[Assessment]) -> tuple[str, ...]:
    """One line per assessment that makes this command's result not ok."""
    if command == "verify":
        flagged = [a for a in assessments if a.is_problem_for_verify]
    else:
        flagged = [a for a in assessments if a.is_problem_for_check]
    return tuple(assessment_line(a) for a in flagged)


def interrupted_apply(manifest: Manifest) -> tuple[str, ...]:
    """The problem an in-flight manifest left by a killed --apply means, if there is one."""
    if not manifest.in_flight:
        return ()
    return (
        "an earlier --apply was interrupted while writing "
        f"{', '.join(r.path for r in manifest.in_flight)}; run --revert, then --apply",
    )


def drift_detail(key: str, disk_sha: str, sha256_before: str, text: str) -> str:
    """What happened to a patched file whose bytes no longer match the manifest."""
    if disk_sha == sha256_before:
        return f"{key} is back to its original bytes (reinstalled?); run --apply"
    if ANY_MARKER.search(text):
        return (
            f"{key} was edited after stackpatch patched it; --apply leaves it alone and "
            "--revert refuses: reinstall the package, then run --apply"
        )
    return f"{key} was replaced since it was patched (reinstalled?); run --apply"
