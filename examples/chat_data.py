"""Chat data for causal-LM fine-tuning: the model's own chat template, loss on assistant turns.

Gemma 4's generation prompt is not a prefix of a rendered assistant turn: it may open a
thought channel (`<|turn>model\n<|channel>thought\n<channel|>`) that history turns do not
carry. Masking that assumes `render(prompt, add_generation_prompt=True)` prefixes the
conversation then either raises or trains on the wrong tokens. Here each assistant turn's
target span is what follows the longest common prefix of the turn and the generation prompt:
exactly what the model must produce after it is prompted, including any thought-channel
markup the assistant message itself carries and the end-of-turn marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
Message = dict[str, Any]


class DataProblem(ValueError):
    """Input data the script cannot train on; the message says which sample and why."""


def load_conversations(path: Path) -> list[list[Message]]:
    """A JSONL file of {"messages": [...]}, or a `datasets` directory with a messages column."""
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataProblem(
                f"{path} is a directory: reading it needs `pip install datasets`"
            ) from None
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys") and "train" in dataset:
            dataset = dataset["train"]
        return [_messages(row, f"{path}[{i}]") for i, row in enumerate(dataset)]
    conversations = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataProblem(f"{path}:{number}: not JSON ({exc.msg})") from None
            conversations.append(_messages(row, f"{path}:{number}"))
    if not conversations:
        raise DataProblem(f"{path}: no conversations")
    return conversations


def _messages(row: Any, where: str) -> list[Message]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataProblem(f"{where}: expected an object with a non-empty 'messages' list")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataProblem(f"{where}: every message needs 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataProblem(f"{where}: no assistant message to learn from")
    return messages


def common_prefix_length(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def assistant_spans(render, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must learn to produce.

    `render(messages, add_generation_prompt)` is the chat template as text.
    """
    full = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], False)
        through = render(messages[: index + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataProblem(
                "the chat template does not render conversations prefix by prefix; "
                "assistant-only masking cannot locate the assistant turns"
            )
        turn = through[len(before) :]
        prompt = render(messages[:index], True)[len(before) :]
        start = len(before) + common_prefix_length(turn, prompt)
        if start < len(through):
            spans.append((start, len(through)))
    return full, spans


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Tokenized:
    examples: list[Example] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0  # no target token left (after truncation)

    @property
    def target_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in e.labels) for e in self.examples)


def labels_for(offsets: Iterable[tuple[int, int]], ids: Sequence[int], spans) -> list[int]:
    """A token is a target when it starts inside an assistant span (padding never is)."""
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def tokenize_conversations(
    tokenizer, conversations: Sequence[Sequence[Message]], max_length: int
) -> Tokenized:
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    result = Tokenized()
    for messages in conversations:
        text, spans = assistant_spans(render, messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        labels = labels_for(offsets, ids, spans)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            result.truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            result.dropped += 1
            continue
        result.examples.append(Example(list(ids), labels))
    return result
