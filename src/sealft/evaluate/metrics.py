"""Metric arithmetic, kept free of models and I/O so it can be tested by hand."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def rate(flags: Sequence[bool | None]) -> dict[str, Any]:
    """Share of True among judged items; unjudged (None) items are counted, not guessed."""
    judged = [f for f in flags if f is not None]
    return {
        "n": len(flags),
        "n_judged": len(judged),
        "rate": round(sum(judged) / len(judged), 6) if judged else None,
    }


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 6) if present else None


_SENTIMENT = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)


def parse_sentiment(text: str) -> str | None:
    """The first 'positive' or 'negative' word in a generation; None if neither appears."""
    found = _SENTIMENT.search(text)
    return found.group(1).lower() if found else None


def accuracy(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy where an unparseable prediction counts as wrong; also reported without them."""
    n = len(labels)
    parsed = [(p, y) for p, y in zip(predictions, labels, strict=True) if p is not None]
    correct = sum(p == y.strip().lower() for p, y in parsed)
    return {
        "n": n,
        "accuracy": round(correct / n, 6) if n else None,
        "parse_failures": n - len(parsed),
        "parse_failure_rate": round((n - len(parsed)) / n, 6) if n else None,
        "accuracy_parsed": round(correct / len(parsed), 6) if parsed else None,
    }


def pair_outcome(model_first: str | None, model_second: str | None) -> float | None:
    """The model's score on one instruction from two judgements of the same pair, one with the
    model's reply shown as A and one with it shown as B. Win = 1, tie = 0.5, loss = 0, averaged
    over the judgements that produced a verdict, so a judge's preference for a position cancels."""
    scores = []
    if model_first is not None:
        scores.append({"A": 1.0, "tie": 0.5, "B": 0.0}[model_first])
    if model_second is not None:
        scores.append({"B": 1.0, "tie": 0.5, "A": 0.0}[model_second])
    return sum(scores) / len(scores) if scores else None


def win_rate(verdicts: Sequence[tuple[str | None, str | None]]) -> dict[str, Any]:
    """Win rate of the model against the reference from (model-as-A, model-as-B) verdicts."""
    outcomes = [pair_outcome(a, b) for a, b in verdicts]
    scored = [o for o in outcomes if o is not None]
    shown_first = [v for pair in verdicts for v in pair if v is not None]
    both = [(a, b) for a, b in verdicts if a is not None and b is not None]
    consistent = sum(pair_outcome(a, None) == pair_outcome(None, b) for a, b in both)
    return {
        "n": len(verdicts),
        "n_judged": len(scored),
        "win_rate": round(sum(scored) / len(scored), 6) if scored else None,
        # Per instruction: both verdicts for the model (win), both against (loss), an even
        # score (two ties, or one win and one loss: draw) or one tie plus a win/loss (partial).
        "wins": sum(o == 1.0 for o in scored),
        "losses": sum(o == 0.0 for o in scored),
        "draws": sum(o == 0.5 for o in scored),
        "partial": sum(o in (0.25, 0.75) for o in scored),
        # How often the judge picked whichever reply it saw first: 0.5 means no position bias.
        "first_position_rate": round(sum(v == "A" for v in shown_first) / len(shown_first), 6)
        if shown_first else None,
        "order_consistency": round(consistent / len(both), 6) if both else None,
    }
