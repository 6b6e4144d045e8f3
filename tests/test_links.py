"""Links to GitHub use its canonical form, `https://github.com/OWNER/REPO/...`.

Sources captured through a rewriting proxy carry its host instead of github.com; such a link
is wrong for every reader. Checked in the registry's references and in every tracked file but
the fixtures (verbatim upstream source, kept byte for byte) and the benchmarks' raw logs
(other programs' output, kept as printed).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from patches.registry import load_patches

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s<>()\[\]{}'\"`,|\\]+", re.IGNORECASE)


def non_canonical_github_links(text: str) -> list[str]:
    """Every link in `text` that points at GitHub other than as https://github.com/OWNER/REPO."""
    wrong = []
    for url in URL.findall(text):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if "github" not in host:
            continue
        segments = [s for s in parts.path.split("/") if s]
        if parts.scheme != "https" or host != "github.com" or len(segments) < 2:
            wrong.append(url)
    return wrong


def test_the_check_tells_canonical_links_from_others() -> None:
    assert (
        non_canonical_github_links(
            "see https://github.com/huggingface/peft/pull/3007 and https://huggingface.co/google, "
            "(https://github.com/unslothai/unsloth/pull/5432)."
        )
        == []
    )
    proxy = "github." + "mirror.example.net"  # built here, so this file passes its own scan
    others = [
        f"https://{proxy}/huggingface/transformers/issues/45482",
        "http://" + "github.com/huggingface/peft",
        "https://" + "www.github.com/huggingface/peft",
        "https://" + "raw.githubusercontent.com/huggingface/peft/main/setup.py",
        "https://" + "github.com/huggingface",
    ]
    assert non_canonical_github_links(" ".join(others)) == others


def test_registry_references_are_canonical() -> None:
    wrong = {
        p.id: bad
        for p in load_patches()
        if (bad := [u for r in p.references for u in non_canonical_github_links(r)])
    }
    assert wrong == {}


VERBATIM = ("tests/fixtures/", "bench/results/peers-raw/")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False, text=True
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    files = []
    for name in listed.stdout.split("\0"):
        path = ROOT / name
        verbatim = name.startswith(VERBATIM)
        if name and not verbatim and path.is_file():
            files.append(path)
    return files


def test_tracked_files_link_to_github_canonically() -> None:
    wrong = {}
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not text
        if bad := non_canonical_github_links(text):
            wrong[path.relative_to(ROOT).as_posix()] = bad
    assert wrong == {}
