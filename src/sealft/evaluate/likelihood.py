"""Suite `task-loss`: how well a model fits held-out answers of the fine-tuning task.

Long-form fine-tuning data (instructions, dialogues) has no accuracy to read off a short
generation, and an LLM judge may not be at hand. The held-out answers' loss needs neither: the
mean next-token negative log-likelihood of reference answers the model never trained on,
under its chat template, with the same response-only labels as fine-tuning. Lower is better;
a data filter that removes useful rows shows up as a higher held-out loss than all-data
fine-tuning's. The same pass counts the answer tokens the model predicts top-1 (TRL's
`mean_token_accuracy`), the suite's accuracy: higher is better, in points a reader can compare.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sealft.data import load_examples, sample_rows
from sealft.losses import per_example_nll_and_hits
from sealft.tokenize import IGNORE_INDEX, collate, require_usable, tokenize_examples

SUITE = "task-loss"


def load_task_rows(path: str, sample: int | None, seed: int):
    """The held-out rows (any format `sealft finetune` reads), as a seeded sample that keeps
    file order. Read before the model loads, so a bad file fails in seconds."""
    return sample_rows(load_examples(path), sample, seed)


@torch.no_grad()
def task_loss(model, tokenizer, examples, max_length: int, batch_size: int,
              source: str) -> dict[str, Any]:
    """Token-weighted mean NLL of the reference answers (and its perplexity) and the share of
    their tokens predicted top-1; rows whose prompt leaves no room for an answer within
    max_length are skipped and counted."""
    tokenized = tokenize_examples(examples, tokenizer, max_length, cache=False,
                                  desc="tokenising held-out answers")
    require_usable(tokenized, source, max_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first: batches of similar length waste the least padding.
    order = np.argsort(-tokenized.lengths(), kind="stable").tolist()
    total, hits, tokens, per_row = 0.0, 0.0, 0, []
    for start in range(0, len(order), batch_size):
        batch = collate(tokenized, order[start:start + batch_size], pad_id, device)
        sums, row_hits = per_example_nll_and_hits(model, batch)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        total += float(sums.sum())
        hits += float(row_hits.sum())
        tokens += int(counts.sum())
        per_row += (sums / counts.clamp(min=1)).tolist()
    loss = total / max(tokens, 1)
    return {"kind": "likelihood", "source": source, "total": len(examples),
            "rows": len(tokenized), "skipped": len(tokenized.skipped),
            "truncated": len(tokenized.truncated), "tokens": tokens,
            "loss": round(loss, 6), "perplexity": round(math.exp(loss), 4),
            "token_accuracy": round(hits / max(tokens, 1), 6),
            "row_loss_median": round(float(np.median(per_row)), 6)}
