"""Metric arithmetic: rates with unjudged items, SST-2 parsing, both-order win rates."""

from __future__ import annotations

import pytest

from sealft.evaluate.metrics import accuracy, pair_outcome, parse_sentiment, rate, win_rate


def test_rate_ignores_unjudged_but_counts_them():
    assert rate([True, False, None, True]) == {"n": 4, "n_judged": 3, "rate": 0.666667}
    assert rate([None])["rate"] is None
    assert rate([])["rate"] is None


@pytest.mark.parametrize("text,label", [
    ("positive", "positive"), ("Negative.", "negative"), ("The sentiment is POSITIVE", "positive"),
    ("negative, not positive", "negative"), ("neutral", None), ("positively", None), ("", None),
])
def test_parse_sentiment(text, label):
    assert parse_sentiment(text) == label


def test_accuracy_counts_parse_failures_as_wrong():
    out = accuracy(["positive", None, "negative", "negative"],
                   ["positive", "positive", "positive", "negative"])
    assert out["accuracy"] == 0.5
    assert out["parse_failures"] == 1 and out["parse_failure_rate"] == 0.25
    assert out["accuracy_parsed"] == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("first,second,score", [
    ("A", "B", 1.0),      # preferred the model in both orders
    ("B", "A", 0.0),      # preferred the reference in both orders
    ("A", "A", 0.5),      # always picked position A: the bias cancels
    ("B", "B", 0.5),      # always picked position B
    ("tie", "tie", 0.5),
    ("A", "tie", 0.75),
    ("tie", "A", 0.25),
    ("A", None, 1.0),     # one order failed: use the other
    (None, None, None),
])
def test_pair_outcome_both_orders(first, second, score):
    assert pair_outcome(first, second) == score


def test_win_rate_arithmetic():
    verdicts = [("A", "B"), ("B", "A"), ("A", "A"), ("tie", "tie"), ("A", "tie"), (None, None)]
    out = win_rate(verdicts)
    # (1 + 0 + 0.5 + 0.5 + 0.75) / 5 judged pairs
    assert out["win_rate"] == pytest.approx(2.75 / 5)
    assert out["n"] == 6 and out["n_judged"] == 5
    assert (out["wins"], out["losses"], out["draws"], out["partial"]) == (1, 1, 2, 1)
    # Position A was chosen in 5 of the 10 verdicts given.
    assert out["first_position_rate"] == 0.5
    # Both orders agree on (A,B), (B,A), (tie,tie); not on (A,A) or (A,tie).
    assert out["order_consistency"] == pytest.approx(3 / 5)


def test_a_judge_that_always_picks_a_gives_exactly_half():
    assert win_rate([("A", "A")] * 10)["win_rate"] == 0.5
    assert win_rate([("A", "A")] * 10)["first_position_rate"] == 1.0
