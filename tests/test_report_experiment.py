"""`sealft report` on an experiment dir: the per-method table with 95% intervals and the
refusal-vs-task-accuracy plot with error bars."""

from __future__ import annotations

import csv
from pathlib import Path

from sealft.cli import main

SUMMARY = [  # what `sealft experiment` writes to results_summary.csv (mean, ci95 half-width)
    {"method": "base", "keep_ratio": 1.0, "seeds": 1, "seeds_ok": 1,
     "safety_refusal_rate_mean": 0.56, "safety_refusal_rate_ci95": "",
     "task_accuracy_mean": 0.57, "task_accuracy_ci95": ""},
    {"method": "all", "keep_ratio": 1.0, "seeds": 3, "seeds_ok": 3,
     "safety_refusal_rate_mean": 0.30, "safety_refusal_rate_ci95": 0.047,
     "task_accuracy_mean": 0.80, "task_accuracy_ci95": 0.02},
    {"method": "seal", "keep_ratio": 0.8, "seeds": 3, "seeds_ok": 2,
     "safety_refusal_rate_mean": 0.54, "safety_refusal_rate_ci95": 0.101,
     "task_accuracy_mean": 0.81, "task_accuracy_ci95": 0.03},
]


def _experiment_dir(folder: Path, rows: list[dict] = SUMMARY) -> Path:
    folder.mkdir()
    with open(folder / "results_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _long_form_rows() -> list[dict]:
    """SUMMARY without a label's accuracy, as a long-form grid has none."""
    return [{k: v for k, v in r.items() if not k.startswith("task_accuracy")} for r in SUMMARY]


def test_report_draws_the_experiment_tradeoff(tmp_path, capsys):
    exp = _experiment_dir(tmp_path / "grid")
    assert main(["report", str(exp), f"output={tmp_path / 'rep'}"]) == 0
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "## Experiment grid" in markdown
    assert "| base | 1 | 1/1 | 56.0 | 57.0 |" in markdown  # one seed: no interval
    assert "| all | 1 | 3/3 | 30.0 ± 4.7 | 80.0 ± 2.0 |" in markdown
    assert "| seal | 0.8 | 2/3 | 54.0 ± 10.1 | 81.0 ± 3.0 |" in markdown
    plot = tmp_path / "rep" / "tradeoff_grid.png"
    assert plot.stat().st_size > 10_000 and "tradeoff_grid.png" in markdown
    assert "1 experiment" in capsys.readouterr().err


def test_long_form_grid_plots_refusal_against_the_held_out_task_loss(tmp_path):
    """No task accuracy (long-form data): the table shows the held-out task loss and the
    trade-off plot uses it for its x axis."""
    rows = _long_form_rows()
    for r, loss in zip(rows, (1.91, 1.52, 1.55), strict=True):
        r["task_loss_mean"], r["task_loss_ci95"] = loss, ("" if r["seeds"] == 1 else 0.041)
    folder = _experiment_dir(tmp_path / "grid", rows)
    assert main(["report", str(folder), f"output={tmp_path / 'rep'}"]) == 0
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "| all | 1 | 3/3 | 30.0 ± 4.7 | 1.520 ± 0.041 |" in markdown
    assert (tmp_path / "rep" / "tradeoff_grid.png").stat().st_size > 10_000


def test_long_form_grid_with_token_accuracy_plots_against_it(tmp_path):
    """A long-form grid that measured the held-out answers' token accuracy: the table shows it
    with its paired difference from all data, and the plot's x axis is that accuracy, not
    the loss; a label's accuracy, where there is one, still comes first."""
    from sealft.report import task_axis

    rows = _long_form_rows()
    for r, (loss, acc) in zip(rows, ((1.91, 0.412), (1.52, 0.468), (1.55, 0.459)), strict=True):
        r["task_loss_mean"], r["task_token_accuracy_mean"] = loss, acc
        r["task_loss_ci95"] = r["task_token_accuracy_ci95"] = "" if r["seeds"] == 1 else 0.004
        r["task_token_accuracy_vs_all_mean"] = None if r["method"] == "all" else acc - 0.468
        r["task_token_accuracy_vs_all_ci95"] = "" if r["seeds"] == 1 else 0.006
    assert task_axis(rows)[0] == "task_token_accuracy"
    assert task_axis(SUMMARY)[0] == "task_accuracy"
    assert task_axis([{k: v for k, v in r.items() if "token" not in k} for r in rows])[0] == \
        "task_loss"
    folder = _experiment_dir(tmp_path / "grid", rows)
    assert main(["report", str(folder), f"output={tmp_path / 'rep'}"]) == 0
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "Held-out token acc. % ↑ | Δ token acc. vs all, paired (pts) |" in markdown
    assert "| seal | 0.8 | 2/3 | 54.0 ± 10.1 | 1.550 ± 0.004 | 45.9 ± 0.4 | -0.9 ± 0.6 |" in markdown
    assert (tmp_path / "rep" / "tradeoff_grid.png").stat().st_size > 10_000


def test_each_keep_ratio_of_a_method_has_its_own_marker(tmp_path, monkeypatch):
    """A method cut at two ratios shares its colour, so the ratio must show in the marker:
    ratio-free methods are circles, each cut a shape of its own."""
    import matplotlib.axes

    from sealft.report import plot_refusal_vs_task

    drawn = {}
    real = matplotlib.axes.Axes.errorbar

    def record(self, *args, **kwargs):
        drawn[kwargs["label"]] = kwargs["fmt"]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    rows = [{k: None if v == "" else v for k, v in r.items()} for r in SUMMARY]  # as parsed
    half = dict(rows[2], keep_ratio=0.5, safety_refusal_rate_mean=0.6)
    assert plot_refusal_vs_task([*rows, half], tmp_path / "t.png").stat().st_size > 10_000
    assert drawn["base"] == drawn["all"] == "o"
    assert len({drawn["seal 0.8"], drawn["seal 0.5"], "o"}) == 3
