"""`report` from tiny-model evaluation runs plus a selection run with ground-truth flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import toy_finetune_rows, write_jsonl
from test_evaluate_run import args_for, write_eval_data

from sealft.data import load_examples
from sealft.errors import ConfigError, DataError
from sealft.evaluate import evaluate
from sealft.report import ReportArgs, duration, memory, pct, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    data = str(write_eval_data(root / "data"))
    evals = root / "evals"
    for label, seed in (("base", 0), ("seal", 1)):
        evaluate(args_for(tiny_model, data, evals / label, suite="safety,overrefusal,task",
                          label=label, seed=seed))
    selection = make_selection_run(root)
    other = root / "finetune-run"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"wall_seconds": 4000.0,
                                                    "peak_memory_mb": 2048.0}))
    return {"evals": evals, "selection": selection, "other": other}


def make_selection_run(root: Path) -> Path:
    """scores.jsonl + config.yaml as `sealft select` writes them, unsafe rows down-weighted."""
    data = write_jsonl(root / "finetune.jsonl", toy_finetune_rows(n=40))
    run = root / "select-seal"
    run.mkdir()
    rows = []
    for ex in load_examples(str(data)):
        unsafe = ex["meta"]["flag"] == "unsafe"
        weight = 0.3 + 0.01 * ex["index"] if unsafe else 1.0 + 0.005 * ex["index"]
        rows.append({"index": ex["index"], "id": ex["id"], "weight": weight,
                     "logit": weight - 1, "kept": not unsafe or ex["index"] == 0})
    rows[1] = {**rows[1], "weight": None, "logit": None, "kept": False, "skipped": "too long"}
    write_jsonl(run / "scores.jsonl", rows)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"method": "seal", "finetune_data": str(data), "label_field": "flag"}))
    (run / "summary.json").write_text(json.dumps({"method": "seal", "wall_seconds": 75.0,
                                                  "peak_memory_mb": 900.0}))
    return run


def test_report_has_table_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    md_path = report(ReportArgs(runs=(str(runs["evals"]), str(runs["selection"]),
                                      str(runs["other"])), output_dir=str(out), title="Test"))
    md = md_path.read_text()
    assert md.startswith("# Test")
    assert "| Method | Safety refusal ↑ | Harmful ↓ | Over-refusal ↓ | Task acc. ↑ |" in md
    assert "| base |" in md and "| seal |" in md
    assert "advbench" in md and "xstest_safe (over-refusal)" in md
    assert "finetune: " in md and "unsafe: " in md  # kept share by flag
    assert "75 s" in md and "900 MiB" in md  # selection cost
    for name in ("refusal_by_set.png", "safety_vs_helpfulness.png", "kept_by_flag.png",
                 "weights_select_seal.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<table>" in page and "Safety refusal" in page


def test_kept_share_uses_flags_joined_by_id(runs, tmp_path):
    md = report(ReportArgs(runs=(str(runs["selection"]),), output_dir=str(tmp_path))).read_text()
    # toy rows: every 4th of 40 is unsafe -> 10 unsafe, of which only index 0 is kept.
    assert "unsafe: 10.0% of 10" in md
    assert "finetune: 96.7% of 30" in md  # one benign row was skipped (not kept)


def test_labels_override_and_validation(runs, tmp_path):
    evals = (str(runs["evals"] / "base"), str(runs["evals"] / "seal"))
    md = report(ReportArgs(runs=evals, output_dir=str(tmp_path), labels=("A", "B"))).read_text()
    assert "| A |" in md and "| B |" in md
    with pytest.raises(ConfigError, match="labels"):
        report(ReportArgs(runs=evals, output_dir=str(tmp_path), labels=("A", "B", "C")))
    with pytest.raises(ConfigError, match="--runs"):
        ReportArgs(runs=())


def test_selection_without_its_data_still_reports(runs, tmp_path):
    broken = tmp_path / "sel"
    broken.mkdir()
    (broken / "scores.jsonl").write_text((runs["selection"] / "scores.jsonl").read_text())
    (broken / "config.yaml").write_text(yaml.safe_dump({"finetune_data": "/nowhere.jsonl"}))
    md = report(ReportArgs(runs=(str(broken),), output_dir=str(tmp_path / "r"))).read_text()
    assert "flags unavailable" in md
    assert (tmp_path / "r" / "weights_sel.png").is_file()


def test_not_a_run_dir(tmp_path):
    with pytest.raises(DataError, match="not an evaluation"):
        report(ReportArgs(runs=(str(tmp_path),), output_dir=str(tmp_path / "r")))
    with pytest.raises(DataError, match="does not exist"):
        report(ReportArgs(runs=(str(tmp_path / "missing"),), output_dir=str(tmp_path / "r")))


def test_formatting():
    assert pct(0.1234) == "12.3%" and pct(None) == "—" and pct(float("nan")) == "—"
    assert duration(12) == "12 s" and duration(600) == "10.0 min" and duration(7200) == "2.0 h"
    assert memory(512) == "512 MiB" and memory(3072) == "3.0 GiB" and memory(None) == "—"


def test_training_cost_comes_from_the_adapters_run_dir(runs, tmp_path):
    import shutil

    run = tmp_path / "ft-eval"
    shutil.copytree(runs["evals"] / "seal", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["adapter"] = str(runs["other"] / "adapter")  # <finetune run>/adapter
    (run / "summary.json").write_text(json.dumps(summary))
    md = report(ReportArgs(runs=(str(run),), output_dir=str(tmp_path / "r"))).read_text()
    assert "Train time" in md and "66.7 min" in md and "2.0 GiB" in md


SWEEP_ROWS = [
    {"method": "seal", "keep_ratio": 0.5, "safety": 0.8, "acc": 0.7, "note": None},
    {"method": "seal", "keep_ratio": 0.5, "safety": 0.6, "acc": float("nan")},
    {"method": "seal", "keep_ratio": 0.8, "safety": 0.5, "acc": 0.75},
    {"method": "all", "keep_ratio": 1.0, "safety": 0.2, "acc": 0.8},
]


def test_rows_render_as_markdown_and_csv(tmp_path):
    import csv

    from sealft.report import rows_markdown, write_rows_csv

    text = rows_markdown(SWEEP_ROWS[:2], {"Method": "method", "Safety": "safety", "Acc": "acc",
                                          "Note": "note"})
    assert text.splitlines() == ["| Method | Safety | Acc | Note |", "|---|---:|---:|---:|",
                                 "| seal | 0.800 | 0.700 | – |", "| seal | 0.600 | – | – |"]
    path = write_rows_csv(tmp_path / "rows.csv", SWEEP_ROWS, first=("method", "keep_ratio"))
    read = list(csv.DictReader(path.open()))
    assert list(read[0]) == ["method", "keep_ratio", "acc", "note", "safety"]
    assert [r["safety"] for r in read] == ["0.8", "0.6", "0.5", "0.2"] and read[0]["note"] == ""


def test_plot_sweep_averages_points_and_skips_empty(tmp_path):
    from sealft.report import _group_means, plot_sweep

    means = _group_means(SWEEP_ROWS, "keep_ratio", ["safety", "acc"], "method")
    assert means["seal"][0.5] == {"safety": pytest.approx(0.7), "acc": 0.7}  # NaN left out
    assert means["all"] == {1.0: {"safety": 0.2, "acc": 0.8}}
    path = plot_sweep(SWEEP_ROWS, "keep_ratio", {"safety": "Safety (%)", "acc": "Acc (%)"},
                      "method", tmp_path / "sweep.png", flat=("all",))
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_sweep(SWEEP_ROWS, "keep_ratio", {"missing": "x"}, "method",
                      tmp_path / "none.png") is None
