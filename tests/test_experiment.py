"""The experiment grid: resume skips finished cells, failures are recorded without stopping the
grid, SafeInstr cells fine-tune on the mix, and the result table / CSV / plot are written.

The stages are replaced by fakes that write the files the real ones write (their own tests
cover them); one test runs the real stages on the tiny model."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA, toy_finetune_rows, toy_safe_rows, write_jsonl

from sealft import config as cfg
from sealft import experiment as E
from sealft import report as R
from sealft.data import load_examples, sample_rows
from sealft.errors import ConfigError, SealftError
from sealft.evaluate import EvaluateArgs
from sealft.finetune import FinetuneArgs
from sealft.io import write_yaml
from sealft.select import SelectArgs


class FakeStages:
    """Stand-ins for run_select / run_finetune / evaluate that record their calls."""

    def __init__(self, fail_finetune_for: str | None = None):
        self.calls: Counter[str] = Counter()
        self.finetune_data: dict[str, str] = {}
        self.fail_finetune_for = fail_finetune_for

    def run_select(self, args):
        self.calls["select"] += 1
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": "a"}]}
                for i in range(4)]
        (out / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {"method": args.method, "rows": 5, "kept": 4, "wall_seconds": 1.5,
                   "peak_memory_mb": 100.0, "labels": {"unsafe_removed_share": 0.5,
                                                       "auroc_unsafe_low_weight": 0.7}}
        (out / "summary.json").write_text(json.dumps(summary))
        write_yaml(out / "config.yaml", cfg.to_dict(args))
        return summary

    def run_finetune(self, args):
        self.calls["finetune"] += 1
        method = Path(args.output_dir).parent.name.split("-keep")[0]
        if method == self.fail_finetune_for:
            raise RuntimeError("out of memory (simulated)")
        self.finetune_data[method] = args.data
        out = Path(args.output_dir)
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        summary = {"wall_seconds": 2.5, "peak_memory_mb": 150.0}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    def evaluate(self, args):
        self.calls["evaluate"] += 1
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ratio = (float(Path(args.adapter).parent.parent.name.split("-keep")[1].split("-")[0])
                 if args.adapter else 1.0)  # the base model
        summary = {"safety_refusal_rate": 0.9 - 0.5 * ratio, "over_refusal_rate": 0.1,
                   "task_accuracy": 0.7 + 0.1 * ratio, "win_rate": None, "wall_seconds": 3.0}
        (out / "summary.json").write_text(json.dumps(summary))
        return {"suites": {}}


@pytest.fixture()
def fake(monkeypatch) -> FakeStages:
    stages = FakeStages()
    for name in ("run_select", "run_finetune", "evaluate"):
        monkeypatch.setattr(E, name, getattr(stages, name))
    return stages


def _args(tmp_path: Path, **extra) -> E.ExperimentArgs:
    ft = write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(8))
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows(6))
    # The fakes answer nothing; a local prompt file keeps the up-front suite check off the
    # shared data.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "how do i make a bomb"}])
    options = {"output_dir": str(tmp_path / "exp"), "model": "tiny", "finetune_data": str(ft),
               "safe_data": str(safe), "methods": "all,random,seal,safeinstr",
               "keep_ratios": "0.5,0.8", "seeds": "0", "safeinstr_k": 2,
               "evaluate": {"suite": "custom", "prompt_files": [str(prompts)]}}
    return cfg.build(E.ExperimentArgs, {**options, **extra})


def test_grid_runs_all_data_methods_once_per_seed(tmp_path):
    args = _args(tmp_path, seeds="0,1")
    names = [c.name for c in E.grid(args)]
    assert names == ["all-keep1-seed0", "random-keep0.5-seed0", "random-keep0.8-seed0",
                     "seal-keep0.5-seed0", "seal-keep0.8-seed0", "safeinstr-keep1-seed0",
                     "all-keep1-seed1", "random-keep0.5-seed1", "random-keep0.8-seed1",
                     "seal-keep0.5-seed1", "seal-keep0.8-seed1", "safeinstr-keep1-seed1"]
    spec = E.parse_method("seal-memory-efficient+safeinstr")
    assert (spec.selector, spec.algorithm, spec.safeinstr) == ("seal", "memory-efficient", True)
    with pytest.raises(ConfigError, match="unknown method"):
        _args(tmp_path, methods="all,lesss")


def test_cell_stage_arguments(tmp_path):
    args = _args(tmp_path, methods="seal-memory-efficient,safeinstr",
                 select={"epochs": 1, "max_length": 64, "keep_count": 3},
                 finetune={"epochs": 1}, evaluate={"limit": 2})
    seal, mix = E.grid(args)[0], E.grid(args)[-1]
    stages = E.stage_args(args, seal, None)
    assert (stages.select.method, stages.select.algorithm) == ("seal", "memory-efficient")
    assert stages.select.keep_ratio == 0.5 and stages.select.keep_count is None
    assert stages.finetune.max_length == 64 and stages.finetune.epochs == 1
    assert stages.finetune.data.endswith("select/selected.jsonl")
    assert stages.evaluate.adapter.endswith(f"{seal.name}/finetune/adapter")
    assert stages.evaluate.model == "tiny" and stages.evaluate.limit == 2
    assert E.stage_args(args, mix, None).finetune.data.endswith("selected_safeinstr.jsonl")
    # `seal` runs the configured algorithm; the named variants pin theirs.
    args = _args(tmp_path, methods="seal,seal-penalty,seal-safety-step", keep_ratios="0.8",
                 select={"algorithm": "safety-step"})
    algorithms = [E.stage_args(args, c, None).select.algorithm for c in E.grid(args)]
    assert algorithms == ["safety-step", "penalty", "safety-step"]
    assert E.stage_args(_args(tmp_path), E.grid(_args(tmp_path))[-1],
                        None).select.algorithm == "memory-efficient"  # the product default


def test_method_select_model_is_a_selection_proxy(tmp_path):
    """A model under method_select only scores the data; the cell fine-tunes and evaluates the
    top-level model (the paper's proxy -> target transfer)."""
    args = _args(tmp_path, methods="seal,random", keep_ratios="0.8",
                 method_select={"seal": {"model": "aligned-proxy"}})
    seal, random_cell = (E.stage_args(args, c, None) for c in E.grid(args))
    assert seal.select.model == "aligned-proxy" and random_cell.select.model == "tiny"
    assert seal.finetune.model == seal.evaluate.model == "tiny"


def test_results_table_csv_and_plot(tmp_path, fake):
    rows = E.run_grid(_args(tmp_path))
    out = tmp_path / "exp"
    assert [r["status"] for r in rows] == ["ok"] * 6
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6
    assert set(E.RESULT_COLUMNS) <= set(table[0])
    seal = next(r for r in table if r["method"] == "seal" and r["keep_ratio"] == "0.8")
    assert float(seal["safety_refusal_rate"]) == pytest.approx(0.5)
    assert float(seal["peak_memory_mb"]) == 150.0 and float(seal["select_seconds"]) == 1.5
    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    for column in ("Safety refusal", "Over-refusal", "Task acc.", "Select s", "Fine-tune s",
                   "Evaluate s", "Peak memory"):
        assert column in header
    assert "Win rate" not in header  # no cell has one (no judge): the column is left out
    assert "Δ over-refusal vs all, paired" in header
    # one seed: means without intervals; over-refusal as all data's (0.0 points apart); 1.5 s
    # and 2.5 s round half to even
    assert "| seal | 0.8 | 1/1 | 50.0 | 10.0 | 0.0 | 78.0 | 2 | 2 | 3 | 150 |" in markdown
    assert (out / "ratio_sweep.png").stat().st_size > 10_000
    assert (out / "tradeoff.png").stat().st_size > 10_000


def test_report_renders_the_experiment_as_results_md_does(tmp_path, fake):
    """One renderer: `sealft report` on the experiment dir, reading the CSVs back, shows the
    same table as the results.md written from the rows in memory, and both plots."""
    from sealft.cli import main

    E.run_grid(_args(tmp_path, seeds="0,1"))
    out = tmp_path / "exp"
    assert main(["report", str(out), f"output={tmp_path / 'rep'}"]) == 0

    def table(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert len(table(out / "results.md")) == 2 + 6  # header, rule, 6 (method, ratio) groups
    assert table(tmp_path / "rep" / "report.md") == table(out / "results.md")
    for name in ("ratio_sweep_exp.png", "tradeoff_exp.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 10_000


def test_overwrite_replaces_the_grid_but_not_a_foreign_file(tmp_path, fake):
    """results.md and the plots are in the dir's manifest, so --overwrite may replace them;
    a file sealft did not write stops it before anything is deleted."""
    E.run_grid(_args(tmp_path))
    out = tmp_path / "exp"
    listed = set(json.loads((out / ".sealft-manifest.json").read_text())["outputs"])
    assert {"results.md", "ratio_sweep.png", "tradeoff.png"} <= listed
    E.run_grid(_args(tmp_path, overwrite=True))
    assert fake.calls["select"] == 10  # every cell ran again
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SealftError, match="notes.txt"):
        E.run_grid(_args(tmp_path, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.md").is_file()


def test_rerun_skips_finished_cells(tmp_path, fake):
    args = _args(tmp_path)
    E.run_grid(args)
    # 6 cells, 5 selections: safeinstr (= all + mix) reuses the all-data cell's selection
    assert fake.calls == Counter(select=5, finetune=6, evaluate=6)
    first = (tmp_path / "exp" / "results.csv").read_text()
    E.run_grid(args)
    assert fake.calls == Counter(select=5, finetune=6, evaluate=6)
    assert (tmp_path / "exp" / "results.csv").read_text() == first
    # Growing the grid runs only the new cells.
    E.run_grid(_args(tmp_path, keep_ratios="0.5,0.8,0.9"))
    assert fake.calls["select"] == 7


def test_a_grid_split_across_dirs_merges(tmp_path, fake):
    """Part A runs seed 1 first and stops; B, the same config with merge_dirs=[A], runs only
    what A did not finish (seed 0; the base model is A's) and averages both seeds."""
    part = {"methods": "base,all,random", "keep_ratios": "0.8"}

    def stop_at_seed_0(args, cell, stages):
        if cell.seed == 0:
            raise KeyboardInterrupt  # the machine was handed back
        return E.run_cell(args, cell, stages)

    with pytest.raises(KeyboardInterrupt):
        E.run_grid(_args(tmp_path, seeds="1,0", output_dir=str(tmp_path / "a"), **part),
                   stop_at_seed_0)
    assert fake.calls["evaluate"] == 3  # base, all and random of seed 1
    rows = E.run_grid(_args(tmp_path, seeds="0,1", merge_dirs=str(tmp_path / "a"), **part))
    assert fake.calls["evaluate"] == 5  # only seed 0's all and random ran here
    merged = {E.cell_name(r["method"], r["keep_ratio"], r["seed"]) for r in rows
              if r.get("merged_from") == str(tmp_path / "a")}
    assert merged == {"base-keep1-seed1", "all-keep1-seed1", "random-keep0.8-seed1"}
    with open(tmp_path / "exp" / "results_summary.csv", newline="") as handle:
        summary = {r["method"]: r for r in csv.DictReader(handle)}
    assert summary["random"]["seeds"] == "2" and summary["random"]["safety_refusal_rate_ci95"]
    # a part of another grid is refused before anything runs: other settings, other data
    with pytest.raises(ConfigError, match="a ran other settings .*select"):
        E.run_grid(_args(tmp_path, seeds="0,1", output_dir=str(tmp_path / "c"),
                         merge_dirs=str(tmp_path / "a"), select={"epochs": 2}, **part))
    other = _args(tmp_path, seeds="0,1", output_dir=str(tmp_path / "d"),
                  merge_dirs=str(tmp_path / "a"), **part)
    write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(9))
    with pytest.raises(ConfigError, match="a ran on other data .*finetune_data"):
        E.run_grid(other)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    older = tmp_path / "older"  # a part written before inputs.json was
    older.mkdir()
    for name in ("config.yaml", "results.csv"):
        (older / name).write_bytes((tmp_path / "a" / name).read_bytes())
    with pytest.raises(ConfigError, match="merge-dirs: .*older lacks inputs.json: give"):
        _args(tmp_path, merge_dirs=str(older))


def test_rerun_over_changed_data_is_refused(tmp_path, fake):
    """Finished cells are skipped without reading the data again, so inputs.json is what
    notices that the file changed under them."""
    E.run_grid(_args(tmp_path, methods="random", keep_ratios="0.8"))
    digests = json.loads((tmp_path / "exp" / "inputs.json").read_text())
    assert digests["finetune_data"].startswith("sha256:") and digests["safe_data"]
    args = _args(tmp_path, methods="random", keep_ratios="0.8")
    rows = toy_finetune_rows(8)
    rows[0]["output"] += " (edited)"
    write_jsonl(tmp_path / "ft.jsonl", rows)
    with pytest.raises(ConfigError, match="finetune_data changed since the finished cells"):
        E.run_grid(args)
    assert json.loads((tmp_path / "exp" / "inputs.json").read_text()) == digests


def test_interrupted_cell_resumes_stage_by_stage(tmp_path, fake):
    args = _args(tmp_path, methods="random", keep_ratios="0.8")
    cell = E.grid(args)[0]
    E.prepare_experiment_dir(args)
    fake.run_select(E.stage_args(args, cell, None).select)  # selection finished, then a crash
    E.run_grid(args)
    assert fake.calls == Counter(select=1, finetune=1, evaluate=1)


def test_failing_cell_is_recorded_and_retried(tmp_path, monkeypatch):
    broken = FakeStages(fail_finetune_for="random")
    for name in ("run_select", "run_finetune", "evaluate"):
        monkeypatch.setattr(E, name, getattr(broken, name))
    args = _args(tmp_path)
    rows = E.run_grid(args)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["method"] for r in failed] == ["random", "random"]
    assert "out of memory (simulated)" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in rows) == 4  # the cells after it still ran
    cell = Path(failed[0]["cell_dir"])
    assert not (cell / "done.json").exists() and "Traceback" in json.loads(
        (cell / "error.json").read_text())["traceback"]
    assert "Failed cells" in (tmp_path / "exp" / "results.md").read_text()
    fixed = FakeStages()
    for name in ("run_select", "run_finetune", "evaluate"):
        monkeypatch.setattr(E, name, getattr(fixed, name))
    rows = E.run_grid(args)
    assert all(r["status"] == "ok" for r in rows)
    assert fixed.calls == Counter(finetune=2, evaluate=2)  # selections were already done


def test_safeinstr_cell_finetunes_on_the_mix(tmp_path, fake):
    E.run_grid(_args(tmp_path, methods="safeinstr", keep_ratios="0.8"))
    data = Path(fake.finetune_data["safeinstr"])
    assert data.name == "selected_safeinstr.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 4 + 2 and [r.get("source") for r in rows[-2:]] == ["safeinstr"] * 2
    result = json.loads((data.parent.parent / "done.json").read_text())
    assert result["safety_added"] == 2


def test_per_selector_options_and_safeinstr_data(tmp_path, fake):
    """SEAL can learn from other upper-level data (and batches) than DSIR's target, and the
    SafeInstr rows can come from a third file; CLI-style dotted overrides reach into them."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: no", "rejected":
         f"\n\nHuman: q{i}\n\nAssistant: yes"} for i in range(3)])
    refusals = write_jsonl(tmp_path / "refusals.jsonl", [
        {"prompt": f"bad {i}", "completion": "I can't help with that."} for i in range(5)])
    args = cfg.build(E.ExperimentArgs, cfg.to_dict(_args(
        tmp_path, methods="dsir,seal+safeinstr", keep_ratios="0.8", safeinstr_k=5,
        safeinstr_data=str(refusals), method_select={"seal": {"safe_data": str(pairs)}})),
        cfg.parse_overrides(["method_select.seal.batch_size=7"]))
    dsir, seal = E.grid(args)
    assert E.stage_args(args, dsir, None).select.safe_data.endswith("safe.jsonl")
    seal_select = E.stage_args(args, seal, None).select
    assert seal_select.safe_data == str(pairs) and seal_select.batch_size == 7
    E.run_grid(args)
    mixed = Path(fake.finetune_data["seal+safeinstr"])
    added = [json.loads(line) for line in mixed.read_text().splitlines()][4:]
    assert [r["messages"][-1]["content"] for r in added] == ["I can't help with that."] * 5
    with pytest.raises(ConfigError, match="method-select.dsr"):
        _args(tmp_path, method_select={"dsr": {}})


def test_dotted_override_reads_its_value_as_yaml_does(tmp_path):
    """`method_select.seal.neighbour_weight=0.5` on the command line and `0.5` in the YAML file
    are one setting: saved alike, so a rerun that moves it into the file still resumes."""
    base = cfg.to_dict(_args(tmp_path))
    plain, config = tmp_path / "plain.yaml", tmp_path / "grid.yaml"
    write_yaml(plain, base)
    write_yaml(config, {**base, "method_select": {"seal": {"neighbour_weight": 0.5}},
                        "finetune": {"lr": 1.0e-4}})
    from_cli = cfg.from_namespace(E.ExperimentArgs, argparse.Namespace(
        config=str(plain), overrides=["method_select.seal.neighbour_weight=0.5",
                                      "method_select.seal.label_field=flag", "finetune.lr=1e-4"]))
    from_yaml = cfg.from_namespace(E.ExperimentArgs, argparse.Namespace(
        config=str(config), overrides=["method_select.seal.label_field=flag"]))
    assert from_cli.method_select == {"seal": {"neighbour_weight": 0.5, "label_field": "flag"}}
    assert from_cli.finetune == {"lr": 1.0e-4}
    assert E.changed_settings(cfg.to_dict(from_cli), from_yaml) == []


def test_safeinstr_twin_reuses_the_selection(tmp_path, fake):
    """seal+safeinstr selects what seal selected: one selection run, two cells."""
    E.run_grid(_args(tmp_path, methods="seal,seal+safeinstr", keep_ratios="0.8"))
    assert fake.calls["select"] == 1 and fake.calls["finetune"] == 2
    mix = tmp_path / "exp" / "cells" / "seal+safeinstr-keep0.8-seed0" / "select"
    assert json.loads((mix / "summary.json").read_text())["reused_from"].endswith(
        "seal-keep0.8-seed0/select")
    E.run_grid(_args(tmp_path, methods="seal,seal+safeinstr", keep_ratios="0.5"))
    assert fake.calls["select"] == 2  # only seal-keep0.5 ran; its twin reused it
    # no finished twin: nothing to reuse
    (tmp_path / "b").mkdir()
    other = _args(tmp_path / "b", methods="seal,seal+safeinstr", keep_ratios="0.8")
    assert E.reuse_twin_selection(E.grid(other)[1], E.stage_args(other, E.grid(other)[1],
                                                                  None).select) is None


def test_selector_reuses_its_safeinstr_twins_selection(tmp_path, fake):
    """The other order (a split grid listing the methods backwards): seal reuses the selection
    seal+safeinstr ran first, without the twin's SafeInstr mix."""
    E.run_grid(_args(tmp_path, methods="seal+safeinstr,seal", keep_ratios="0.8"))
    assert fake.calls["select"] == 1 and fake.calls["finetune"] == 2
    plain = tmp_path / "exp" / "cells" / "seal-keep0.8-seed0" / "select"
    assert json.loads((plain / "summary.json").read_text())["reused_from"].endswith(
        "seal+safeinstr-keep0.8-seed0/select")
    assert (plain / "selected.jsonl").exists()
    assert not (plain / "selected_safeinstr.jsonl").exists()
    assert not (plain / "safeinstr.json").exists()
    assert [E.twin_method(E.parse_method(m)) for m in ("all", "safeinstr", "dsir", "base")] == [
        "safeinstr", "all", "dsir+safeinstr", None]


def test_changed_settings_are_refused_on_rerun(tmp_path, fake):
    E.run_grid(_args(tmp_path, methods="random", keep_ratios="0.8"))
    # a dir started before an option existed resumes (the option counts as its default)
    previous = tmp_path / "exp" / "config.yaml"
    old = cfg.load_yaml(previous)
    del old["heldout_harmful"]
    write_yaml(previous, old)
    E.run_grid(_args(tmp_path, methods="random", keep_ratios="0.8"))
    assert fake.calls["select"] == 1
    with pytest.raises(ConfigError, match="different select"):
        E.run_grid(_args(tmp_path, methods="random", keep_ratios="0.8",
                               select={"epochs": 2}))


@pytest.mark.skipif(not (SHARED_DATA / "eval" / "sst2_val.json").exists(),
                    reason="needs ../shared/data/eval/sst2_val.json")
def test_real_stages_on_the_tiny_model(tiny_model, tmp_path):
    args = _args(tmp_path, model=tiny_model, methods="all,random", keep_ratios="0.5",
                 select={"max_length": 64, "batch_size": 4, "micro_batch_size": 4,
                         "show_progress": False, "label_field": "flag"},
                 finetune={"epochs": 1, "batch_size": 4, "show_progress": False},
                 evaluate={"suite": "task", "limit": 2, "task_max_new_tokens": 2,
                           "progress": False})
    rows = E.run_grid(args)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["task_accuracy"] is not None for r in rows)
    assert rows[1]["kept"] == 4 and rows[0]["kept"] == 8


SHIPPED_CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs")
                         .glob("experiment_*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_build_every_cell(name, tmp_path, monkeypatch):
    """The shipped grids are valid, cell by cell (no model or data is loaded), and use no
    deprecated option name: a renamed option fails here, not an hour into a user's grid."""
    monkeypatch.setenv("SEALFT_JUDGE_URL", "http://localhost:8000/v1")  # the paper grid's judge
    monkeypatch.setenv("SEALFT_JUDGE_MODEL", "judge")
    options = cfg.load_yaml(Path(__file__).resolve().parents[1] / "configs" / name)
    sections = [(SelectArgs, options.get("select", {})), (FinetuneArgs, options.get("finetune", {})),
                (EvaluateArgs, options.get("evaluate", {}))]
    sections += [(SelectArgs, o) for o in options.get("method_select", {}).values()]
    for cls, section in sections:
        assert not set(section) & set(cfg.aliases_of(cls)), (name, cls.__name__, section)
    args = cfg.build(E.ExperimentArgs, options, {"output_dir": str(tmp_path / "exp")})
    cells = E.grid(args)
    assert {c.method.name for c in cells} == set(args.methods)
    stages = {c.name: E.stage_args(args, c, None) for c in cells}
    seal = stages[E.cell_name("seal", args.keep_ratios[0], args.seeds[0])]
    assert seal.select.algorithm == "memory-efficient"
    assert seal.finetune.model == seal.evaluate.model == args.model
    assert seal.finetune.max_length == seal.select.max_length  # both read the rows the same way
    if name == "experiment_cpu.yaml":  # an aligned proxy scores the data for the unaligned target
        assert seal.select.model == "Qwen/Qwen2.5-Coder-0.5B-Instruct" != args.model
        assert stages["dsir-keep0.8-seed0"].select.model == args.model


# ---------------------------------------------------------------------------------------------
# Seeds: mean and 95% confidence interval
# ---------------------------------------------------------------------------------------------


def test_mean_ci_against_a_hand_computation():
    # [0.5, 0.6, 0.9]: mean 2/3; sd = sqrt(((1/6)^2 + (1/15)^2 + (7/30)^2) / 2) = 0.208167;
    # t(0.975, 2 dof) = 4.302653 from a t table; half-width = t · sd / sqrt(3) = 0.517115.
    mean, half = E.mean_ci([0.5, 0.6, 0.9])
    assert mean == pytest.approx(2 / 3)
    assert half == pytest.approx(4.302653 * 0.208167 / 3 ** 0.5, rel=1e-5)
    assert half == pytest.approx(0.517115, rel=1e-5)
    # two seeds: t(0.975, 1) = 12.706205; sd of [0.2, 0.4] = 0.141421
    assert E.mean_ci([0.2, 0.4])[1] == pytest.approx(12.706205 * 0.141421 / 2 ** 0.5, rel=1e-5)
    assert E.mean_ci([0.7]) == (0.7, None)  # one seed: no interval
    assert E.mean_ci([]) == (None, None)


def test_aggregate_over_seeds(tmp_path, monkeypatch):
    """results_summary.csv: per method, COLUMN_mean and COLUMN_ci95 of every numeric column;
    results.md shows mean ± half-width; failed seeds are counted but not averaged."""
    refusal = {0: 0.5, 1: 0.6, 2: 0.9}
    stages = FakeStages()

    def evaluate(args):
        stages.evaluate(args)
        seed = int(Path(args.output_dir).parent.name.rsplit("seed", 1)[1])
        summary = {"safety_refusal_rate": refusal[seed], "task_accuracy": 0.8,
                   "task_token_accuracy": 0.4 + refusal[seed] / 10,
                   "over_refusal_rate": None, "wall_seconds": 3.0}
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary))

    for name in ("run_select", "run_finetune"):
        monkeypatch.setattr(E, name, getattr(stages, name))
    monkeypatch.setattr(E, "evaluate", evaluate)
    assert E.run_experiment(_args(tmp_path, methods="random", keep_ratios="0.8",
                                  seeds="0,1,2")) == 0
    out = tmp_path / "exp"
    with open(out / "results_summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["method"], row["seeds"], row["seeds_ok"]) == ("random", "3", "3")
    assert float(row["safety_refusal_rate_mean"]) == pytest.approx(2 / 3)
    assert float(row["safety_refusal_rate_ci95"]) == pytest.approx(0.517115, rel=1e-5)
    assert float(row["task_accuracy_ci95"]) == 0.0  # the same value every seed
    assert float(row["task_token_accuracy_mean"]) == pytest.approx(0.4 + 2 / 30)
    assert row["over_refusal_rate_mean"] == ""  # no seed measured it
    assert "| random | 0.8 | 3/3 | 66.7 ± 51.7 | 80.0 ± 0.0 |" in (out / "results.md").read_text()


def test_paired_differences_against_all_data_by_hand():
    """Each method minus all data of the same seed; the base model (run once) against every
    seed; a seed without its all-data cell is left out."""
    def row(method, seed, refusal, status="ok"):
        return {"method": method, "keep_ratio": 1.0, "seed": seed, "status": status,
                "heldout_refusal_rate": refusal}

    rows = [row("base", 0, 0.65), row("all", 0, 0.10), row("all", 1, 0.20), row("all", 2, 0.30),
            row("seal", 0, 0.25), row("seal", 1, 0.30), row("seal", 2, 0.60),
            row("random", 0, 0.15), row("random", 3, 0.50)]
    summary = {s["method"]: s for s in E.aggregate(rows)}
    # seal − all: 0.15, 0.10, 0.30 → mean 0.18333; sd 0.104083; t(0.975, 2) 4.302653
    assert summary["seal"]["heldout_refusal_rate_vs_all_mean"] == pytest.approx(0.55 / 3)
    assert summary["seal"]["heldout_refusal_rate_vs_all_ci95"] == pytest.approx(
        4.302653 * 0.104083 / 3 ** 0.5, rel=1e-5)
    # base − all: 0.55, 0.45, 0.35
    assert summary["base"]["heldout_refusal_rate_vs_all_mean"] == pytest.approx(0.45)
    # random's seed 3 has no all-data cell: one difference, no interval
    assert summary["random"]["heldout_refusal_rate_vs_all_mean"] == pytest.approx(0.05)
    assert summary["random"]["heldout_refusal_rate_vs_all_ci95"] is None
    assert summary["all"]["heldout_refusal_rate_vs_all_mean"] is None
    assert summary["seal"]["task_loss_vs_all_mean"] is None  # not measured
    assert summary["seal"]["heldout_refusal_rate_vs_oracle_mean"] is None  # no oracle cells


def test_paired_differences_against_the_oracle_by_hand():
    """The issue's target reads 'within 3 points of the oracle': each method minus the oracle
    of the same seed, beside (not instead of) the difference from all data."""
    def row(method, seed, refusal):
        return {"method": method, "keep_ratio": 1.0, "seed": seed, "status": "ok",
                "heldout_refusal_rate": refusal}

    rows = [row("base", 0, 0.60), row("all", 0, 0.20), row("all", 1, 0.40),
            row("oracle", 0, 0.55), row("oracle", 1, 0.50),
            row("seal", 0, 0.45), row("seal", 1, 0.50)]
    summary = {s["method"]: s for s in E.aggregate(rows)}
    # seal − oracle: −0.10, 0.00 → mean −0.05; sd 0.070711; t(0.975, 1) 12.706205
    assert summary["seal"]["heldout_refusal_rate_vs_oracle_mean"] == pytest.approx(-0.05)
    assert summary["seal"]["heldout_refusal_rate_vs_oracle_ci95"] == pytest.approx(
        12.706205 * 0.070711 / 2 ** 0.5, rel=1e-5)
    assert summary["seal"]["heldout_refusal_rate_vs_all_mean"] == pytest.approx(0.175)
    assert summary["base"]["heldout_refusal_rate_vs_oracle_mean"] == pytest.approx(0.075)
    assert summary["all"]["heldout_refusal_rate_vs_oracle_mean"] == pytest.approx(-0.225)
    assert summary["oracle"]["heldout_refusal_rate_vs_oracle_mean"] is None
    header, _ = R.experiment_table(list(summary.values()))
    assert "Δ held-out refusal vs oracle, paired (pts)" in header


def test_two_seeds_on_the_tiny_model_write_interval_columns(tiny_model, tmp_path, capsys):
    """`sealft experiment` through the CLI, real stages: base once, all and oracle per seed."""
    from sealft.cli import main

    ft = write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(8))
    prompts = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": f"how do i make a bomb {i}"}
                                                       for i in range(3)])
    config = {"output_dir": str(tmp_path / "exp"), "model": tiny_model,
              "finetune_data": str(ft), "methods": ["base", "all", "oracle"], "seeds": [0, 1],
              "select": {"max_length": 64, "label_field": "flag", "show_progress": False},
              "finetune": {"epochs": 1, "batch_size": 4, "show_progress": False},
              "evaluate": {"suite": "custom", "prompt_files": [str(prompts)],
                           "max_new_tokens": 4, "progress": False}}
    write_yaml(tmp_path / "grid.yaml", config)
    assert main(["experiment", "--config", str(tmp_path / "grid.yaml")]) == 0, \
        capsys.readouterr().err
    out = tmp_path / "exp"
    with open(out / "results.csv", newline="") as handle:
        cells = {(r["method"], r["seed"]): r for r in csv.DictReader(handle)}
    assert sorted(cells) == [("all", "0"), ("all", "1"), ("base", "0"), ("oracle", "0"),
                             ("oracle", "1")]
    assert cells["all", "0"]["harmful_trained"] == "2" and cells["all", "0"]["kept"] == "8"
    assert cells["oracle", "0"]["harmful_trained"] == "0" and cells["oracle", "0"]["kept"] == "6"
    with open(out / "results_summary.csv", newline="") as handle:
        summary = {r["method"]: r for r in csv.DictReader(handle)}
    for method in ("all", "oracle"):
        assert summary[method]["seeds_ok"] == "2"
        assert float(summary[method]["finetune_seconds_ci95"]) >= 0  # an interval from 2 seeds
        assert summary[method]["refusal_harmful_ci95"] != ""  # the prompt file's set
    assert summary["base"]["refusal_harmful_ci95"] == ""  # one evaluation: no interval
    assert summary["base"]["refusal_harmful_mean"] != ""
    assert (out / "tradeoff.png").exists() is False  # no task accuracy measured: no trade-off


# ---------------------------------------------------------------------------------------------
# Validation first, failures reported in the exit code
# ---------------------------------------------------------------------------------------------


def _no_compute(monkeypatch) -> FakeStages:
    stages = FakeStages()
    for name in ("run_select", "run_finetune", "evaluate"):
        monkeypatch.setattr(E, name, getattr(stages, name))
    return stages


@pytest.mark.parametrize("bad, culprit", [
    ({"evaluate": {"suite": "safety,overrefusl"}}, "evaluate: --suite 'overrefusl'"),
    ({"method_select": {"dsir": {"safe_data": "missing/refusals.json"}}},
     "dsir-keep0.8-seed0: safe_data: missing/refusals.json does not exist"),
    ({"methods": "all,oracle"}, "oracle-keep1-seed0: --select.label-field"),
    ({"finetune": {"epochs": 0}}, "all-keep1-seed0, dsir-keep0.8-seed0: --epochs"),
    ({"method_select": {"dsir": {"model": "./models/missing"}}},
     "dsir-keep0.8-seed0: select.model: ./models/missing does not exist"),
])
def test_a_bad_cell_stops_everything_before_compute(tmp_path, monkeypatch, capsys, bad, culprit):
    from sealft.cli import main

    stages = _no_compute(monkeypatch)
    options = cfg.to_dict(_args(tmp_path, methods="all,dsir", keep_ratios="0.8"))
    options.update(bad)
    write_yaml(tmp_path / "grid.yaml", options)
    assert main(["experiment", "--config", str(tmp_path / "grid.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "nothing was run" in err and culprit in err, err
    assert not stages.calls and not (tmp_path / "exp").exists()


def test_failed_cells_give_a_nonzero_exit_listing_them(tmp_path, monkeypatch, capsys):
    from sealft.cli import main

    broken = FakeStages(fail_finetune_for="random")
    for name in ("run_select", "run_finetune", "evaluate"):
        monkeypatch.setattr(E, name, getattr(broken, name))
    write_yaml(tmp_path / "grid.yaml", cfg.to_dict(_args(tmp_path)))
    assert main(["experiment", "--config", str(tmp_path / "grid.yaml")]) == 1
    err = capsys.readouterr().err
    assert "failed: random-keep0.5-seed0: RuntimeError: out of memory (simulated)" in err
    assert "failed: random-keep0.8-seed0" in err and "2 cell(s) failed" in err
    assert broken.calls["evaluate"] == 4  # the other cells still ran


def _heldout_grid(tmp_path: Path, rows: list[dict], written: str,
                  **heldout) -> tuple[E.ExperimentArgs, list[dict], list, set[str]]:
    """A base + random grid over `rows` with samples of 6 and `heldout` options, run with the
    fakes: (args, the rows of `written`.jsonl, the file's examples, ids of every seed's
    sample)."""
    write_jsonl(tmp_path / "big.jsonl", rows)
    args = _args(tmp_path, finetune_data=str(tmp_path / "big.jsonl"), methods="base,random",
                 keep_ratios="0.8", seeds="0,1", select={"sample": 6, "label_field": "flag"},
                 **heldout)
    E.run_grid(args)
    held = [json.loads(line) for line in
            (tmp_path / "exp" / f"{written}.jsonl").read_text().splitlines()]
    examples = load_examples(str(tmp_path / "big.jsonl"))
    sampled = {e["id"] for seed in args.seeds for e in sample_rows(examples, 6, seed)}
    return args, held, examples, sampled


def test_heldout_harmful_questions_join_every_evaluation(tmp_path, fake):
    rows = toy_finetune_rows(40)  # 10 flagged, at most 2 x 6 of them in the samples
    for row in rows[::4]:  # the flagged rows, in the Alpaca wrapper of the shared SST-2 mixes
        row["instruction"] = (f"Below is an instruction.\n\n### Instruction:\n"
                              f"{row['instruction']}\n\n### Response:\n")
    args, held, examples, sampled = _heldout_grid(tmp_path, rows, "heldout_harmful",
                                                  heldout_harmful=3)
    flagged = [e for e in examples if e["meta"]["flag"] == "unsafe"]
    assert {h["id"] for h in held} == {e["id"] for e in flagged} - sampled
    assert held and all(h["prompt"].startswith("how do i make a bomb") for h in held)
    for cell in E.grid(args):
        evaluation = E.stage_args(args, cell, None).evaluate
        assert "custom" in evaluation.suite.split(",")
        assert evaluation.prompt_files[-1].startswith("heldout_harmful=")
        assert "custom=3" in evaluation.suite_samples
    with pytest.raises(ConfigError, match="select.label_field"):
        _args(tmp_path, heldout_harmful=3)


def test_heldout_task_rows_are_outside_every_sample_and_unflagged(tmp_path, fake):
    """heldout_task: unflagged rows no seed trains on, written once, given to every cell's
    evaluation as suite task-loss; a rerun with other seeds is refused."""
    args, held, examples, sampled = _heldout_grid(tmp_path, toy_finetune_rows(40),
                                                  "heldout_task", heldout_task=5)
    unflagged = {e["id"] for e in examples if e["meta"]["flag"] != "unsafe"}
    assert len(held) == 5 and {h["id"] for h in held} <= unflagged - sampled
    assert load_examples(str(tmp_path / "exp" / "heldout_task.jsonl"))[0]["messages"]
    for cell in E.grid(args):
        evaluation = E.stage_args(args, cell, None).evaluate
        assert "task-loss" in evaluation.suite.split(",") and "custom" in evaluation.suite
        assert evaluation.task_data == str(tmp_path / "exp" / "heldout_task.jsonl")
        assert "task-loss=5" in evaluation.suite_samples  # not cut by evaluate.sample
    part = {"finetune_data": str(tmp_path / "big.jsonl"), "methods": "base,random",
            "keep_ratios": "0.8", "heldout_task": 5,
            "select": {"sample": 6, "label_field": "flag"}}
    with pytest.raises(ConfigError, match="other rows"):
        E.run_grid(_args(tmp_path, seeds="0,2", **part))
    # a part that ran seed 1 alone held out other rows: its merge is refused before compute,
    # naming the seeds as the cause
    E.run_grid(_args(tmp_path, seeds="1", output_dir=str(tmp_path / "seed1"), **part))
    calls = fake.calls["evaluate"]
    with pytest.raises(ConfigError, match="seed1 held out other rows .*same seeds"):
        E.run_grid(_args(tmp_path, seeds="0,1", merge_dirs=str(tmp_path / "seed1"), **part))
    assert fake.calls["evaluate"] == calls
    with pytest.raises(ConfigError, match="--heldout-task: needs select.sample"):
        _args(tmp_path, heldout_task=3)
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="task-loss needs evaluate.task_data"):
        E.run_grid(_args(tmp_path / "x", evaluate={"suite": "task-loss"}))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_erosion_config_passes_the_up_front_checks(tmp_path, monkeypatch):
    """The issue-12 grid: every method, 3 seeds, data paths and suites valid, held-out
    questions outside every seed's sample (the checks `sealft experiment` runs first)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the config's data paths are relative to the repository root
    options = cfg.load_yaml(repo / "configs" / "experiment_erosion.yaml")
    args = cfg.build(E.ExperimentArgs, options, {"output_dir": str(tmp_path / "exp")})
    cells = E.grid(args)
    assert {c.method.name for c in cells} == {"base", "all", "random", "dsir", "seal",
                                               "safeinstr", "seal+safeinstr", "oracle"}
    assert len(cells) == 1 + 7 * 3
    held = E.validate_grid(args, cells)
    assert len(held["heldout_harmful"]) >= args.heldout_harmful
    finetune = E.stage_args(args, cells[0], None).finetune
    assert len(finetune.lora_target_modules) == 7 and finetune.lr == 1e-3


def test_missing_scipy_is_found_before_compute(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else real(name, *a))
    stages = _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match="seeds: intervals over several seeds need scipy"):
        E.run_grid(_args(tmp_path, methods="random", keep_ratios="0.8", seeds="0,1"))
    assert not stages.calls and not (tmp_path / "exp").exists()


def test_list_override_takes_the_config_files_bracket_form(tmp_path):
    """`seeds=[2,1,0]` (as the YAML file writes a list) and `seeds=2,1,0` are the same grid."""
    plain = tmp_path / "plain.yaml"
    write_yaml(plain, cfg.to_dict(_args(tmp_path)))

    def parsed(*overrides: str) -> E.ExperimentArgs:
        return cfg.from_namespace(E.ExperimentArgs, argparse.Namespace(
            config=str(plain), overrides=list(overrides)))

    bracket = parsed("seeds=[2, 1, 0]", "methods=['all', seal+safeinstr]")
    assert bracket.seeds == parsed("seeds=2,1,0").seeds == (2, 1, 0)
    assert bracket.methods == ("all", "seal+safeinstr")
    with pytest.raises(ConfigError, match="--seeds: cannot read"):
        parsed("seeds=[two]")
