"""P10: text-only training step of a Gemma 4 whose text config has vision-bidirectional attention.

The larger Gemma 4 checkpoints set `use_bidirectional_attention="vision"`; with it,
transformers 5.5.x raises ValueError in create_causal_mask_mapping on any training forward
without `mm_token_type_ids`, i.e. on every text-only fine-tuning batch.
Exit 1 with the error on the unpatched stack, 0 on the patched one.
"""

from __future__ import annotations

import torch
from tiny_gemma4 import bug, fine, multimodal_config
from transformers import Gemma4ForConditionalGeneration

torch.manual_seed(0)
model = Gemma4ForConditionalGeneration(multimodal_config(use_bidirectional_attention="vision"))
model.train()
input_ids = torch.randint(0, 512, (2, 12))
try:
    loss = model(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids
    ).loss
    loss.backward()
except ValueError as exc:
    bug(exc)
if not torch.isfinite(loss):
    raise SystemExit(f"inconclusive: loss is {loss}")
fine(f"loss {loss.item():.3f}, backward ran")
