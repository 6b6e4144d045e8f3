"""The token ids and labels every trainer of the peers benchmark trains on.

    python bench/peers/tokens.py --model-dir CKPT --data DIR --lengths 512 2048 4096

Tokenizes DIR/chatL.jsonl (bench/example_data.py) with the checkpoint's tokenizer exactly
as examples/train_gemma4_qlora.py does (examples/chat_data.py: the chat template, labels on
assistant tokens only, cut to L tokens) and writes DIR/tokensL.json. The peers read these
files instead of tokenizing themselves, so every trainer sees the same ids and targets in
the same order; the stackpatch adapter checks that the example's own rows are identical.
Reading needs no transformers (a peer such as unsloth must be imported before it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from measure import write_atomic

ROOT = Path(__file__).resolve().parents[2]
IGNORE_INDEX = -100


def rows_digest(rows: Sequence[dict[str, list[int]]]) -> str:
    """sha256 over the ids and labels, to show two trainers trained on the same tokens."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


def tokens_path(data_dir: Path, length: int) -> Path:
    return data_dir / f"tokens{length}.json"


def tokenize(tokenizer, jsonl: Path, length: int) -> dict[str, Any]:
    """The example's tokenization of one chat file, as the JSON document tokens.py writes."""
    sys.path.insert(0, str(ROOT / "examples"))
    from chat_data import load_conversations, tokenize_conversations

    tokenized = tokenize_conversations(tokenizer, load_conversations(jsonl), length)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in tokenized.examples]
    return {
        "length": length,
        "source": str(jsonl),
        "truncated": tokenized.truncated,
        "dropped": tokenized.dropped,
        "target_tokens": tokenized.target_tokens,
        "sha256": rows_digest(rows),
        "rows": rows,
    }


class TokensProblem(ValueError):
    """A tokens file that cannot be trained on as the benchmark needs."""


def load(path: Path, length: int, needed: int) -> list[dict[str, list[int]]]:
    """`needed` rows of exactly `length` tokens with at least one target each."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokensProblem(f"{path}: cannot read ({exc}); run bench/peers/tokens.py") from None
    rows = document.get("rows", [])
    if document.get("length") != length:
        raise TokensProblem(f"{path}: holds length {document.get('length')}, not {length}")
    if document.get("sha256") != rows_digest(rows):
        raise TokensProblem(f"{path}: rows do not match their sha256 (edited or torn file)")
    short = [i for i, r in enumerate(rows) if len(r["input_ids"]) != length]
    if short:
        raise TokensProblem(f"{path}: rows {short[:5]} are not {length} tokens long")
    if len(rows) < needed:
        raise TokensProblem(f"{path}: {len(rows)} rows, the run needs {needed} (one per step)")
    for index, row in enumerate(rows[:needed]):
        if len(row["labels"]) != length or all(x == IGNORE_INDEX for x in row["labels"][1:]):
            raise TokensProblem(f"{path}: row {index} has no target token")
    return rows[:needed]


def digest_of(path: Path) -> str:
    return json.loads(path.read_text(encoding="utf-8"))["sha256"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="bench/example_data.py's --out")
    parser.add_argument("--lengths", type=int, nargs="+", required=True)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    for length in args.lengths:
        source = args.data / f"chat{length}.jsonl"
        if not source.is_file():
            print(f"error: {source} is missing; run bench/example_data.py first", file=sys.stderr)
            return 2
        document = tokenize(tokenizer, source, length)
        target = tokens_path(args.data, length)
        write_atomic(target, json.dumps(document))
        print(
            f"wrote {target}: {len(document['rows'])} rows, {document['target_tokens']} target "
            f"tokens, {document['truncated']} truncated, sha256 {document['sha256'][:12]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
