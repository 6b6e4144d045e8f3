"""The command line. Exit codes: 0 fine, 1 problems found, 2 usage or environment error.

This module stays light: `--verify -q` is answered by `patches.quick_verify` from the manifest
and the files' hashes; every other command imports `patches.commands` (libcst, rich).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from patches import __version__, quick_verify
from patches.entry import missing_dependency
from patches.errors import StackpatchError, UsageError

MODES = (
    ("check", "report each patch's state (the default)"),
    ("apply", "apply every pending patch, all or nothing"),
    ("verify", "exit 1 unless every recommended in-range patch is applied and unchanged"),
    ("revert", "restore the original files byte for byte"),
    ("diff", "print the unified diff --apply would make"),
    ("validate", "run each patch's reproducer unpatched and patched; write records"),
    ("validation-status", "print VALIDATION-STATUS.md"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="apply_patches.py",
        description="Version-aware patches for transformers, peft and bitsandbytes "
        "(Gemma 4 fine-tuning on one GPU).",
        epilog="Exit codes: 0 fine, 1 problems found, 2 usage or environment error.",
    )
    mode = parser.add_mutually_exclusive_group()
    for command, help_text in MODES:
        mode.add_argument(
            f"--{command}", dest="command", action="store_const", const=command, help=help_text
        )
    parser.add_argument(
        "--only", default="", metavar="IDS", help="comma-separated patch ids, e.g. P4,P10"
    )
    parser.add_argument(
        "--skip", default="", metavar="IDS", help="comma-separated patch ids to leave out"
    )
    parser.add_argument(
        "--include-historical",
        action="store_true",
        help="also consider historical patches (off by default)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--python", metavar="PATH", help="patch the environment of this interpreter"
    )
    target.add_argument(
        "--site-packages",
        metavar="DIR",
        help="patch the packages installed in this directory (pip install --target)",
    )
    parser.add_argument(
        "--records",
        metavar="DIR",
        help="where --validate writes its records (default: validation/records)",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="RELEASE",
        help="with --check: assess a release before upgrading to it; a requirement "
        "(transformers==5.23.0), a wheel file or an unpacked directory; repeatable",
    )
    parser.add_argument(
        "--matrix",
        nargs="+",
        default=[],
        metavar="REQUIREMENT",
        help="assess every published release in each range, e.g. 'transformers>=5.5'; "
        "writes validation/matrix.json and VALIDATION-STATUS.md",
    )
    parser.add_argument(
        "--all",
        dest="every_release",
        action="store_true",
        help="with --matrix: every release, not only the newest patch release per minor",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (schema in README)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.add_argument("--version", action="version", version=f"stackpatch {__version__}")
    parser.set_defaults(command="check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        try:
            if quick_verify.takes(args):
                return quick_verify.run(args)  # needs packaging only to compare versions
            from patches.commands import run_command  # libcst, rich
        except ModuleNotFoundError as missing:
            return missing_dependency(missing)
        return run_command(args)
    except StackpatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; any partial apply was rolled back", file=sys.stderr)
        return 130
    except Exception as exc:  # a traceback is a bug: say so in one line, show it on request
        if os.environ.get("STACKPATCH_DEBUG"):
            import traceback  # here: most runs never need it, and --verify -q counts every ms

            traceback.print_exc()
        print(
            f"error: internal error ({exc.__class__.__name__}: {exc}); nothing further was "
            "changed: rerun with STACKPATCH_DEBUG=1 and report the traceback",
            file=sys.stderr,
        )
        return 2
