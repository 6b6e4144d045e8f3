"""A tiny checkpoint of the 26B-A4B's architecture, for run.sh's CPU dry run (DRY_RUN=1).

    python bench/peers/tiny_checkpoint.py --dir DIR

Same class (Gemma4ForCausalLM), the same layer kinds (sliding and full attention with
attention_k_eq_v, a dense MLP beside 128-expert-style fused expert stacks), scaled down to
two layers and 8 experts so every adapter can load and train it on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whole_model_memory import CONFIG_26B_A4B

TINY = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_experts": 8,
    "top_k_experts": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 32,
    "global_head_dim": 64,
    "vocab_size": 8192,  # bench/example_data.py's word-level tokenizer has 8,011 tokens
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**{**CONFIG_26B_A4B, **TINY})
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.dir)
    print(f"wrote {args.dir}: {sum(p.numel() for p in model.parameters())} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
