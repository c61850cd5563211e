"""How near each row's request lies to the safe set's harmful requests.

The final pass reads the aligned proxy's own sense of what to refuse, and a small proxy answers
many plainly harmful requests: the selector then cannot find those rows (docs/selection.md,
"What the proxy itself refuses bounds the selector"). The safe set is itself a list of harmful
requests, and a row whose request lies among them in a sentence encoder's space asks for the
same kind of help, whether or not the proxy would refuse it. A request is scored line by line
and counts by its nearest line, so that a prompt template wrapped around every row (Alpaca's
"Below is an instruction that describes a task…") does not dilute the request inside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sealft.data import Example
from sealft.embeddings import SentenceEncoder
from sealft.selector import spread

REQUESTS_KEY = "requests"
Standard = dict[str, list[float]]
"""Mean and spread of the signal and of the nearness: {"signal": [m, s], "nearness": [m, s]}."""


def request_text(example: Example) -> str:
    """What the row asks: its user turns before the answer."""
    return "\n".join(m["content"] for m in example["messages"][:-1] if m["role"] == "user")


class SafeNeighbours:
    """The safe set's requests as unit vectors; `score` gives each row the mean cosine of its
    nearest line to the `k` nearest of them."""

    def __init__(self, requests: torch.Tensor, encoder: SentenceEncoder, k: int = 10):
        self.requests, self.encoder = requests, encoder
        self.k = min(k, len(requests))

    @classmethod
    def fit(cls, safe: list, encoder: SentenceEncoder, k: int = 10) -> SafeNeighbours:
        """`safe`: the upper level's examples, or its (chosen, rejected) pairs."""
        examples = [s[0] if isinstance(s, tuple) else s for s in safe]
        return cls(encoder.embed([request_text(e) for e in examples]), encoder, k)

    def score(self, examples: list[Example]) -> torch.Tensor:
        by_line = self.by_line([request_text(e) for e in examples])
        return torch.stack([near.max() for near in by_line]) if by_line else torch.zeros(0)

    def by_line(self, texts: list[str]) -> list[torch.Tensor]:
        """Each text's non-empty lines, each scored by its mean cosine to the `k` nearest
        safe-set requests (one tensor per text, one value per line)."""
        lines = [[t for t in text.split("\n") if t.strip()] or [""] for text in texts]
        flat = [t for group in lines for t in group]
        if not flat:
            return []
        near = (self.encoder.embed(flat) @ self.requests.T).topk(self.k, dim=1).values.mean(1)
        return list(near.split([len(group) for group in lines]))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({REQUESTS_KEY: self.requests.contiguous()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, encoder: SentenceEncoder, k: int = 10) -> SafeNeighbours:
        from safetensors.torch import load_file

        return cls(load_file(str(path))[REQUESTS_KEY], encoder, k)


def mix(signal: torch.Tensor, nearness: torch.Tensor, weight: float,
        standard: Standard | None = None) -> tuple[torch.Tensor, Standard]:
    """(1 − w)·z(signal) + w·z(nearness), and the standard it used: `standard` (the fitted
    rows', for rows scored later) or, by default, the inputs' own. Standardised, because the
    two come in unrelated units."""
    if standard is None:
        standard = {name: [float(x.mean()), float(spread(x))]
                    for name, x in (("signal", signal), ("nearness", nearness))}

    def z(values: torch.Tensor, key: str) -> torch.Tensor:
        mean, scale = standard[key]
        return (values - mean) / scale

    return (1 - weight) * z(signal, "signal") + weight * z(nearness, "nearness"), standard
