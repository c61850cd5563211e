"""The data selector: one logit per fine-tuning example, weights, save/load, top-p selection.

Verbs in the DSIR style: `Selector(n)` is fit by `bilevel.py`; `weights()` scores;
`keep_mask()` selects; `save()` / `Selector.load()` persist it (keyed by example id).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sealft.errors import DataError, SealftError
from sealft.io import atomic_save
from sealft.selection_run import PARAMETRIZATIONS


def spread(scores: torch.Tensor) -> torch.Tensor:
    """The scale that standardises a score: its standard deviation, floored, 1 for one row.
    Standardised logits keep the weights N·softmax(ω) on a scale that does not depend on the
    signal's units."""
    return scores.std().clamp(min=1e-8) if len(scores) > 1 else torch.ones(())


class Selector(torch.nn.Module):
    """Learnable logits ω; weights σ(ω) = N·softmax(ω) (mean weight 1) or 2·sigmoid(ω).

    Both give weight 1 to every example at ω = 0, so training starts as plain SFT.
    """

    def __init__(self, n: int, parametrization: str = "softmax"):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise SealftError(f"--weighting {parametrization!r}: use softmax or sigmoid")
        self.parametrization = parametrization
        self.logits = torch.nn.Parameter(torch.zeros(n))

    def weights(self, rows: torch.Tensor | None = None, local: bool = False) -> torch.Tensor:
        """σ(ω)[rows]. `local=True` holds the softmax normaliser constant, so gradients reach
        only the logits of `rows` (the diagonal of ∂σ/∂ω); the values are the same."""
        if self.parametrization == "sigmoid":
            all_weights = 2 * torch.sigmoid(self.logits)
            return all_weights if rows is None else all_weights[rows]
        log_normaliser = torch.logsumexp(self.logits, dim=0)
        if local:
            log_normaliser = log_normaliser.detach()
        picked = self.logits if rows is None else self.logits[rows]
        return len(self.logits) * torch.exp(picked - log_normaliser)

    def save(self, path: str | Path, ids: list[str]) -> None:
        metadata = {"parametrization": self.parametrization, "ids": json.dumps(ids)}
        tensors = {"logits": self.logits.detach().cpu().contiguous()}
        atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> tuple[Selector, list[str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        logits = load_file(str(path))["logits"]
        selector = cls(len(logits), metadata.get("parametrization", "softmax"))
        with torch.no_grad():
            selector.logits.copy_(logits)
        return selector, json.loads(metadata.get("ids", "[]"))


def keep_count_for(n_usable: int, keep_ratio: float | None, keep_count: int | None) -> int:
    if keep_count is not None:
        if keep_count > n_usable:
            raise SealftError(
                f"--keep-count {keep_count} is larger than the {n_usable} usable examples; "
                f"use at most {n_usable} or --keep-ratio"
            )
        return keep_count
    assert keep_ratio is not None
    return min(n_usable, math.ceil(keep_ratio * n_usable - 1e-9))


def keep_mask(scores: np.ndarray, ids: list[str], usable: np.ndarray, count: int) -> np.ndarray:
    """Keep the `count` usable examples with the highest score; ties broken by id, so the
    result does not depend on row order."""
    candidates = [i for i in range(len(ids)) if usable[i]]
    candidates.sort(key=lambda i: (-float(scores[i]), ids[i]))
    kept = np.zeros(len(ids), dtype=bool)
    kept[candidates[:count]] = True
    return kept


def top_by_weight(scores: list[dict], keep_ratio: float | None,
                  keep_count: int | None = None) -> np.ndarray:
    """Keep mask over the rows of a selection's scores.jsonl: another cut of the same fitted
    weights (rows without a weight could not be used and are never kept)."""
    weights = np.array([-np.inf if r["weight"] is None else r["weight"] for r in scores])
    usable = np.isfinite(weights)
    count = keep_count_for(int(usable.sum()), keep_ratio, keep_count)
    return keep_mask(weights, [r["id"] for r in scores], usable, count)


def align_scores(score_ids: list[str], scores: np.ndarray, ids: list[str], source: str):
    """Reorder scores learned on one copy of a dataset to another copy, by id."""
    by_id = dict(zip(score_ids, scores, strict=True))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(ids)} examples have no score (e.g. id "
            f"{missing[0]!r}); the scores were learned on a different dataset"
        )
    return np.array([by_id[i] for i in ids])
