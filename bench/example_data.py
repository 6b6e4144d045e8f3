"""Chat data and a tokenizer for running the training example on a random-weight checkpoint.

    python bench/example_data.py --model-dir CKPT --out DIR --lengths 512 2048

Writes a word-level tokenizer with the example's Gemma-4-style chat template into CKPT (a
checkpoint made by bench/whole_model_memory.py has none) and, per length L, DIR/chatL.jsonl:
conversations long enough that every sample is cut to exactly L tokens, three quarters of
them assistant tokens, so each step trains on a full-length sequence.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from tiny import build_tokenizer

WORDS = [f"w{i}" for i in range(8000)]


def conversation(rng: random.Random, length: int) -> dict:
    user = " ".join(rng.choices(WORDS, k=length // 4))
    answer = " ".join(rng.choices(WORDS, k=length))
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    build_tokenizer(set(WORDS)).save_pretrained(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for length in args.lengths:
        rows = [conversation(rng, length) for _ in range(args.samples)]
        path = args.out / f"chat{length}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
