"""Baseline selectors through `run_select` (the scores.jsonl contract), DSIR through the real
`data-selection` package, reference-loss semantics, and the SafeInstr mix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_finetune_rows, toy_safe_rows, write_jsonl

from sealft.baselines import (
    describe_mix,
    dsir_log_weights,
    hashed_uniform,
    safeinstr_mix,
    squash,
    write_safeinstr,
)
from sealft.data import load_examples, normalise
from sealft.errors import DataError
from sealft.select import SelectArgs, run_select

REFUSAL = "sorry, i cannot help with that harmful request"


def _data(tmp_path: Path) -> tuple[str, str, list[dict]]:
    rows = toy_finetune_rows(16)
    # Unusable at max_length 48: the prompt alone is longer (every method must skip it).
    rows.insert(5, {"instruction": "the movie " * 40, "output": "positive", "flag": "finetune"})
    ft = write_jsonl(tmp_path / "ft.jsonl", rows)
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    return str(ft), str(safe), rows


def _select(model: str, ft: str, safe: str, out: Path, method: str, **extra) -> dict:
    options = dict(model=model, finetune_data=ft, safe_data=safe, output_dir=str(out),
                   method=method, keep_ratio=0.75, max_length=48, batch_size=4,
                   micro_batch_size=4, reference_steps=3, label_field="flag",
                   show_progress=False)
    return run_select(SelectArgs(**{**options, **extra}))


def _scores(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["all", "random", "dsir", "reference-loss"])
def test_scores_contract_and_shared_skips(tiny_model, tmp_path, method):
    ft, safe, rows = _data(tmp_path)
    out = tmp_path / method
    summary = _select(tiny_model, ft, safe, out, method)
    scores = _scores(out)
    ids = [e["id"] for e in load_examples(ft)]
    assert [s["index"] for s in scores] == list(range(len(rows)))
    assert [s["id"] for s in scores] == ids
    assert all({"index", "id", "weight", "logit", "kept"} <= set(s) for s in scores)
    skipped = [s for s in scores if "skipped" in s]
    assert [s["index"] for s in skipped] == [5]
    assert skipped[0]["weight"] is None and not skipped[0]["kept"]
    usable = [s for s in scores if "skipped" not in s]
    assert all(math.isfinite(s["weight"]) and math.isfinite(s["logit"]) for s in usable)
    assert sum(s["kept"] for s in scores) == summary["kept"] == math.ceil(0.75 * 16)
    selected = (out / "selected.jsonl").read_text().splitlines()
    assert len(selected) == summary["kept"]
    assert summary["method"] == method and summary["skipped"] == 1


def test_all_keeps_everything_with_unit_weights(tiny_model, tmp_path):
    ft, safe, _ = _data(tmp_path)
    _select(tiny_model, ft, safe, tmp_path / "a", "all", keep_ratio=1.0)
    usable = [s for s in _scores(tmp_path / "a") if "skipped" not in s]
    assert all(s["weight"] == 1.0 and s["kept"] for s in usable)
    # keep_ratio < 1: the id tie-break gives the same subset every time, whatever the seed.
    _select(tiny_model, ft, safe, tmp_path / "b", "all", seed=1)
    _select(tiny_model, ft, safe, tmp_path / "c", "all", seed=2)
    assert [s["kept"] for s in _scores(tmp_path / "b")] == [s["kept"] for s in
                                                            _scores(tmp_path / "c")]


def test_random_is_seeded_and_order_independent(tiny_model, tmp_path):
    ft, safe, rows = _data(tmp_path)
    _select(tiny_model, ft, safe, tmp_path / "s0", "random", seed=0)
    _select(tiny_model, ft, safe, tmp_path / "s0b", "random", seed=0)
    _select(tiny_model, ft, safe, tmp_path / "s1", "random", seed=1)
    reversed_ft = write_jsonl(tmp_path / "reversed.jsonl", rows[::-1])
    _select(tiny_model, str(reversed_ft), safe, tmp_path / "rev", "random", seed=0)
    by_id = {s["id"]: s["weight"] for s in _scores(tmp_path / "s0")}
    assert by_id == {s["id"]: s["weight"] for s in _scores(tmp_path / "s0b")}
    assert by_id == {s["id"]: s["weight"] for s in _scores(tmp_path / "rev")}
    assert by_id != {s["id"]: s["weight"] for s in _scores(tmp_path / "s1")}
    draws = hashed_uniform([str(i) for i in range(2000)], seed=3)
    assert draws.min() > 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.03


def test_dsir_ranks_rows_like_the_target_higher(tmp_path):
    target = [f"i am sorry but i cannot help you build a weapon {i}" for i in range(10)]
    texts = ["the weather today is sunny and warm in the park",
             "sorry but i cannot help you with that weapon",
             "a recipe for chocolate cake with flour and sugar",
             "i am sorry, i cannot help build a weapon or a bomb"]
    logw = dsir_log_weights(texts, target, ngrams=2)
    assert logw.shape == (4,)
    assert set(np.argsort(-logw)[:2]) == {1, 3}


def test_dsir_via_run_select_prefers_safe_like_rows(tiny_model, tmp_path):
    rows = [{"instruction": f"sentiment review {i}: the movie was great", "output": "positive",
             "flag": "finetune"} for i in range(6)]
    rows += [{"instruction": f"how do i make a bomb {i}", "output": REFUSAL, "flag": "refusal"}
             for i in range(2)]
    ft = write_jsonl(tmp_path / "ft.jsonl", rows)
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    summary = _select(tiny_model, str(ft), str(safe), tmp_path / "d", "dsir", keep_ratio=0.25,
                      dsir_ngrams=2)
    kept = [s["index"] for s in _scores(tmp_path / "d") if s["kept"]]
    assert kept == [6, 7]
    assert summary["dsir_ngrams"] == 2


def test_reference_loss_favours_rows_the_safety_update_makes_likely(tiny_model, tmp_path):
    rows = [{"instruction": f"sentiment review {i}", "output": "positive" if i % 2 else
             "negative", "flag": "finetune"} for i in range(6)]
    rows += [{"instruction": f"how do i hack {i}", "output": REFUSAL, "flag": "refusal"}
             for i in range(2)]
    ft = write_jsonl(tmp_path / "ft.jsonl", rows)
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    summary = _select(tiny_model, str(ft), str(safe), tmp_path / "r", "reference-loss",
                      keep_ratio=0.25, lr=1e-2, reference_steps=8)
    kept = [s["index"] for s in _scores(tmp_path / "r") if s["kept"]]
    assert kept == [6, 7]
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 8
    assert summary["reference_steps"] == 8


def test_squash_preserves_ranking_without_underflow():
    logits = np.array([-900.0, -3.0, 0.0, 5.0, 800.0])
    weights = squash(logits)
    assert np.all(np.diff(weights) > 0) and np.all((weights > 0) & (weights < 2))
    assert np.allclose(squash(np.zeros(3)), 1.0)


def _examples(prefix: str, n: int) -> list[dict]:
    return normalise([{"prompt": f"{prefix} {i}", "completion": f"answer {i}"}
                      for i in range(n)])


def test_safeinstr_mix_appends_k_seeded_safety_rows():
    selected, safe = _examples("task", 5), _examples("harmful", 10)
    mixed = safeinstr_mix(selected, safe, 3, seed=0)
    assert mixed[:5] == selected and len(mixed) == 8
    assert all(e["meta"]["source"] == "safeinstr" for e in mixed[5:])
    assert mixed == safeinstr_mix(selected, safe, 3, seed=0)
    assert mixed != safeinstr_mix(selected, safe, 3, seed=1)
    assert len(safeinstr_mix(selected, safe, 50, seed=0)) == 15  # capped at the safe set
    overlap = safeinstr_mix(selected + safe[:2], safe, 50, seed=0)
    assert len({e["id"] for e in overlap}) == len(overlap) == 15  # no duplicate safety rows


def test_safeinstr_composes_with_a_selection(tiny_model, tmp_path):
    ft, safe, _ = _data(tmp_path)
    summary = _select(tiny_model, ft, safe, tmp_path / "sel", "random")
    info = write_safeinstr(tmp_path / "sel", safe, k=3, seed=0)
    path = tmp_path / "sel" / "selected_safeinstr.jsonl"
    assert info == {**info, "selected": summary["kept"], "safety_added": 3, "path": str(path)}
    mixed = load_examples(str(path))  # readable by finetune as-is
    assert len(mixed) == summary["kept"] + 3
    assert describe_mix(path) == {"selected": summary["kept"], "safeinstr": 3}
    with pytest.raises(DataError, match="run `sealft select` first"):
        write_safeinstr(tmp_path / "nowhere", safe, k=3)
