"""`--tiny`: a tiny Gemma 4 (MoE or dense text model + vision tower), tokenizer and chat data.

The chat template is a small stand-in for Gemma 4's, with the same turn and thought-channel
markers (`<|turn>role ... <turn|>`, `<|channel>thought ... <channel|>`) and the same quirk:
its generation prompt opens an empty thought channel that rendered history turns lack.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|turn>model\n"
    "{% if m.get('reasoning_content') %}<|channel>thought\n{{ m['reasoning_content'] }}"
    "<channel|>{% endif %}{{ m['content'] }}<turn|>\n"
    "{% else %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n<|channel>thought\n<channel|>{% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
ROLES = ["system", "user", "model"]

FACTS = [
    ("what colour is the sky", "the sky is blue"),
    ("what do cows drink", "cows drink water"),
    ("name a prime number", "seven is a prime number"),
    ("which planet is red", "mars is the red planet"),
    ("what is ice made of", "ice is frozen water"),
    ("how many legs has a spider", "a spider has eight legs"),
]


def conversations() -> list[dict]:
    """A small memorisable chat set: single and multi-turn, a system prompt, one reasoning."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in FACTS
    ]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "answer briefly"},
                {"role": "user", "content": FACTS[0][0]},
                {"role": "assistant", "content": FACTS[0][1]},
                {"role": "user", "content": FACTS[1][0]},
                {"role": "assistant", "content": FACTS[1][1]},
            ]
        }
    )
    rows.append(
        {
            "messages": [
                {"role": "user", "content": FACTS[2][0]},
                {
                    "role": "assistant",
                    "reasoning_content": "seven has no divisor but one and seven",
                    "content": FACTS[2][1],
                },
            ]
        }
    )
    return rows


def build_tokenizer(words: set[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + ROLES + sorted(words - set(ROLES)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def build(directory: Path, moe: bool = True) -> tuple[Path, Path]:
    """Write the tiny model + tokenizer and the chat data; return (model dir, data file)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from validation.tiny_gemma4 import multimodal_config

    rows = conversations()
    words = {
        word
        for row in rows
        for message in row["messages"]
        for text in (message["content"], message.get("reasoning_content", ""))
        for word in text.split()
    }
    tokenizer = build_tokenizer(words)
    config = multimodal_config(
        enable_moe_block=moe,
        vocab_size=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config).to(torch.bfloat16)
    model_dir, data = directory / "model", directory / "chat.jsonl"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return model_dir, data
