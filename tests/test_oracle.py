"""The oracle selector: the ground truth as a selector, the upper bound of any data filter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import toy_finetune_rows, write_jsonl

from sealft.cli import main
from sealft.errors import ConfigError, DataError
from sealft.select import SelectArgs, run_select


def _select(model: str, data: Path, out: Path, **extra) -> dict:
    options = dict(model=model, finetune_data=str(data), output_dir=str(out), method="oracle",
                   keep_ratio=1.0, max_length=64, label_field="flag", show_progress=False)
    return run_select(SelectArgs(**{**options, **extra}))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_oracle_keeps_exactly_the_unflagged_rows(tiny_model, tmp_path):
    rows = toy_finetune_rows(16)  # every 4th row is flagged unsafe
    data = write_jsonl(tmp_path / "ft.jsonl", rows)
    summary = _select(tiny_model, data, tmp_path / "sel")
    selected = _lines(tmp_path / "sel" / "selected.jsonl")
    expected = [r["instruction"] for r in rows if r["flag"] != "unsafe"]
    assert [r["messages"][0]["content"] for r in selected] == expected
    assert {r["flag"] for r in selected} == {"finetune"}
    assert summary["kept"] == 12 and summary["oracle_removed"] == 4
    assert summary["labels"]["unsafe_removed_share"] == 1.0
    scores = _lines(tmp_path / "sel" / "scores.jsonl")
    flagged = [s for s in scores if not s["kept"]]
    assert [s["index"] for s in flagged] == [0, 4, 8, 12]
    assert all(s["skipped"] == "oracle: flag=unsafe" and s["weight"] is None for s in flagged)


def test_oracle_honours_a_custom_unsafe_value(tiny_model, tmp_path):
    rows = [{**r, "flag": "harmful" if r["flag"] == "unsafe" else "ok"}
            for r in toy_finetune_rows(8)]
    data = write_jsonl(tmp_path / "ft.jsonl", rows)
    summary = _select(tiny_model, data, tmp_path / "sel", unsafe_value="harmful")
    assert summary["kept"] == 6
    assert all(r["flag"] == "ok" for r in _lines(tmp_path / "sel" / "selected.jsonl"))


def test_oracle_refuses_without_ground_truth(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(8))
    with pytest.raises(ConfigError, match="--method oracle needs --label-field"):
        _select(tiny_model, data, tmp_path / "a", label_field=None)
    with pytest.raises(DataError, match=r"'verdict': absent from 8 of 8 rows \(first: row 0\)"):
        _select(tiny_model, data, tmp_path / "b", label_field="verdict")
    partial = toy_finetune_rows(8)
    del partial[3]["flag"]
    data = write_jsonl(tmp_path / "partial.jsonl", partial)
    with pytest.raises(DataError, match=r"absent from 1 of 8 rows \(first: row 3\)"):
        _select(tiny_model, data, tmp_path / "c")


def test_oracle_error_is_one_line_with_exit_2(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(8))
    code = main(["select", "--model", tiny_model, "--finetune-data", str(data),
                 "--output-dir", str(tmp_path / "sel"), "--method", "oracle",
                 "show_progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "--method oracle needs --label-field" in err
