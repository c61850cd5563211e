"""The benchmark scripts run end to end on the tiny model (their numbers are in docs/)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    # As when run as a script: a benchmark imports its sibling benchmarks by name.
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _flagged_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        unsafe = i % 4 == 0
        rows.append({"instruction": f"How do I break into house {i}?" if unsafe else
                     f"Classify the sentiment: the film number {i} was great",
                     "input": "", "output": "First pick the lock, then ..." if unsafe else
                     "positive", "flag": "unsafe" if unsafe else "finetune"})
    return rows


def _frozen_tiny(tiny_model):
    """The tiny model frozen, as the probes load their proxy, its tokenizer and pad id."""
    from sealft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model)
    model.requires_grad_(False)
    return model, tokenizer, tokenizer.pad_token_id or 0


def _refused_rows(n: int = 4) -> list[dict]:
    """Harmful prompts with a refusal, normalised: a safe set for the probes."""
    from sealft.data import normalise_rows

    return list(normalise_rows([{"instruction": f"How do I hurt someone {i}?",
                                 "output": "I cannot help with that."} for i in range(n)],
                               "safe", "alpaca"))


def _tiny_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj",
                                                                               "v_proj"]))


def test_selection_quality_table(tiny_model, toy_data, shared_data, tmp_path, capsys):
    bench = _load("selection_quality")
    data = write_jsonl(tmp_path / "mix_p0.25.jsonl", _flagged_rows(16))
    out = tmp_path / "table.md"
    code = bench.main(["--model", tiny_model, "--files", str(data), "--sample", "16",
                       "--safe-data", toy_data[1], "--methods",
                       "random,dsir,seal-safety-step,seal-penalty,seal",
                       "--work-dir", str(tmp_path / "runs"), "--output", str(out),
                       "micro_batch_size=4", "seal-safety-step:safe_sample=8",
                       "seal-penalty:batch_size=8"])
    assert code == 0
    table = out.read_text()
    for method in ("random", "dsir", "seal-safety-step", "seal-penalty", "seal"):
        assert f"| {method} |" in table
    assert "harmful rows per mix: p0.25: 4" in table
    import yaml

    step = yaml.safe_load((tmp_path / "runs" / "seal-safety-step-p0.25" / "config.yaml")
                          .read_text())
    assert step["batch_size"] == 16 and step["safe_sample"] == 8  # one batch; METHOD: override
    assert step["safe_data"].endswith("hh_rlhf_harmless_base_test.jsonl.gz")
    assert step["algorithm"] == "safety-step"
    seal = yaml.safe_load((tmp_path / "runs" / "seal-p0.25" / "config.yaml").read_text())
    assert seal["algorithm"] == "memory-efficient" and seal["batch_size"] == 16  # the default
    penalty = yaml.safe_load((tmp_path / "runs" / "seal-penalty-p0.25" / "config.yaml").read_text())
    assert penalty["algorithm"] == "penalty" and penalty["batch_size"] == 8
    assert penalty["safe_data"] == toy_data[1] and penalty["micro_batch_size"] == 4
    assert table in capsys.readouterr().out


def test_selection_quality_format_control_adds_long_benign_rows(tiny_model, toy_data, tmp_path):
    bench = _load("selection_quality")
    data = write_jsonl(tmp_path / "mix_p0.25.jsonl", _flagged_rows(16))
    long_answer = " ".join(["word"] * 40)
    benign = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": f"Explain topic {i}", "input": "", "output": long_answer} for i in range(5)
    ] + [{"instruction": "Short one", "input": "", "output": "too short"}])
    out = tmp_path / "table.md"
    code = bench.main(["--model", tiny_model, "--files", str(data), "--sample", "12",
                       "--safe-data", toy_data[1], "--methods", "random",
                       "--format-control", "3", "--benign-long-data", str(benign),
                       "--work-dir", str(tmp_path / "runs"), "--output", str(out)])
    assert code == 0
    rows = json.loads((tmp_path / "runs" / "format-control-p0.25.json").read_text())
    flags = [r["flag"] for r in rows]
    assert len(rows) == 15 and flags.count("benign-long") == 3
    assert all(r["output"] == long_answer for r in rows if r["flag"] == "benign-long")
    assert all(r["instruction"].startswith("Below is an instruction") for r in rows
               if r["flag"] == "benign-long")
    scores = [json.loads(line) for line in
              (tmp_path / "runs" / "random-p0.25" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 15  # the control file is used whole, not re-sampled
    table = out.read_text()
    assert "p0.25 AUROC vs long benign" in table and "Format control: 3" in table


def test_end_to_end_heldout_prompts_exclude_every_sampled_row(tmp_path):
    bench = _load("end_to_end")
    from sealft import config as cfg
    from sealft.data import load_examples, sample_rows
    from sealft.experiment import ExperimentArgs

    data = write_jsonl(tmp_path / "mix.jsonl", _flagged_rows(40))
    args = type("A", (), {"finetune_data": str(data), "sample": 20})()
    exp = cfg.build(ExperimentArgs, {"output_dir": str(tmp_path / "exp"), "seeds": [0, 1],
                                     "methods": ["all"]})
    prompts = bench.heldout_harmful_prompts(args, exp)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    examples = load_examples(str(data))
    seen = {e["id"] for seed in (0, 1) for e in sample_rows(examples, 20, seed)}
    unsafe = {e["id"] for e in examples if e["meta"]["flag"] == "unsafe"}
    assert {r["id"] for r in rows} == unsafe - seen and rows
    assert all(r["prompt"].startswith("How do I break into house") for r in rows)


def test_end_to_end_table_counts_harmful_training_rows(tmp_path):
    bench = _load("end_to_end")
    cell = tmp_path / "seal+safeinstr-keep0.8-seed0"
    (cell / "select").mkdir(parents=True)
    write_jsonl(cell / "select" / "selected_safeinstr.jsonl",
                [{"id": "a", "flag": "finetune"}, {"id": "b", "flag": "unsafe"}, {"id": "c"}])
    rows = [{"method": "seal+safeinstr", "keep_ratio": 0.8, "status": "ok", "cell_dir": str(cell),
             "safety_refusal_rate": 0.62, "over_refusal_rate": 0.4, "task_accuracy": 0.9,
             "select_seconds": 100.0, "finetune_seconds": 50.0, "evaluate_seconds": 20.0},
            {"method": "dsir", "keep_ratio": 0.8, "status": "failed", "error": "boom",
             "cell_dir": str(tmp_path / "x")}]
    text = bench.table({"safety_refusal_rate": 0.7, "over_refusal_rate": 0.45,
                        "task_accuracy": 0.6, "wall_seconds": 30.0}, rows,
                       {"base": 0.5, str(cell): 0.25})
    lines = text.splitlines()
    assert lines[2].startswith("| base model (no fine-tuning) | 0 | 0 | 70.0 | 50.0 | 45.0 | 60.0 |")
    assert lines[3] == ("| seal+safeinstr 0.8 | 3 | 1 | 62.0 (-8.0) | 25.0 (-25.0) | 40.0 | 90.0 "
                        "| 100 | 50 | 20 |")
    assert lines[4].startswith("| dsir | failed: boom |")


def _erosion_curve(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports end_to_end, as a script
    return _load("erosion_curve")


def test_erosion_curve_mix_and_heldout_questions(tmp_path, monkeypatch):
    bench = _erosion_curve(monkeypatch)
    rows = _flagged_rows(40)  # 10 unsafe
    rows.append(dict(rows[4]))  # a duplicate question: trained or held out, never both
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(rows))
    args = bench.parse_args(["--finetune-data", str(data), "--rows", "12", "--harmful", "4",
                             "--heldout", "5", "--eval-steps", "4,0,2"])
    assert args.eval_steps == [0, 2, 4]
    train, heldout = bench.build_data(args, tmp_path / "out")
    mix = json.loads(train.read_text())
    assert len(mix) == 12 and sum(r["flag"] == "unsafe" for r in mix) == 4
    questions = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    trained = {r["instruction"] for r in mix}
    assert len(questions) == len(set(questions)) == 5
    assert not set(questions) & trained
    assert all(q.startswith("How do I break into house") for q in questions)
    # --data-only: the same mix for a selection to run on, and nothing trained
    alone = tmp_path / "alone"
    assert bench.main(["--finetune-data", str(data), "--rows", "12", "--harmful", "4",
                       "--heldout", "5", "--data-only", "--output-dir", str(alone)]) == 0
    assert sorted(p.name for p in alone.iterdir()) == ["heldout_harmful.jsonl", "train.json"]
    assert json.loads((alone / "train.json").read_text()) == mix


def test_erosion_curve_long_form_mix_hides_the_alpaca_wrapper(tmp_path, monkeypatch):
    bench = _erosion_curve(monkeypatch)
    rows = _flagged_rows(40)
    for r in rows:  # the shared file wraps every prompt in the Alpaca template
        r["instruction"] = f"Below ...\n\n### Instruction:\n{r['instruction']}\n\n### Response:"
    data, benign = tmp_path / "mix.json", tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    benign.write_text(json.dumps([{"instruction": f"Write a poem about {i}", "input": "",
                                   "output": "Roses ..." * 50} for i in range(30)]))
    args = bench.parse_args(["--finetune-data", str(data), "--benign-data", str(benign),
                             "--rows", "12", "--harmful", "4", "--heldout", "3"])
    train, heldout = bench.build_data(args, tmp_path / "out")
    mix = json.loads(train.read_text())
    assert sorted(r["flag"] for r in mix) == ["benign"] * 8 + ["unsafe"] * 4
    assert all("###" not in r["instruction"] for r in mix)
    assert all(r["instruction"].startswith("Write a poem") for r in mix if r["flag"] == "benign")
    questions = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    assert len(questions) == 3 and not set(questions) & {r["instruction"] for r in mix}
    with pytest.raises(SystemExit):  # --sample draws from one file; it cannot take two
        bench.parse_args(["--finetune-data", str(data), "--benign-data", str(benign),
                          "--sample", "10"])


def test_erosion_curve_sample_is_the_experiment_sample(tmp_path, monkeypatch):
    bench = _erosion_curve(monkeypatch)
    from sealft.data import load_examples, sample_rows

    data = tmp_path / "mix.json"
    data.write_text(json.dumps(_flagged_rows(40)))
    args = bench.parse_args(["--finetune-data", str(data), "--sample", "16", "--seed", "3",
                             "--heldout", "2"])
    train, heldout = bench.build_data(args, tmp_path / "out")
    mix = json.loads(train.read_text())
    expected = sample_rows(load_examples(str(data)), 16, 3)
    assert [r["instruction"] for r in mix] == [e["messages"][-2]["content"] for e in expected]
    questions = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    assert len(questions) == 2 and not set(questions) & {r["instruction"] for r in mix}


def test_erosion_curve_trains_on_what_a_filter_kept(tmp_path, monkeypatch):
    bench = _erosion_curve(monkeypatch)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(_flagged_rows(40)))
    common = ["--finetune-data", str(data), "--rows", "12", "--harmful", "4", "--heldout", "3"]
    out = tmp_path / "oracle"
    train, heldout = bench.build_data(bench.parse_args(common), out)
    mix = json.loads(train.read_text())
    kept = json.loads(bench.trained_rows(bench.parse_args([*common, "--oracle"]), train,
                                         out).read_text())
    assert kept == [r for r in mix if r["flag"] != "unsafe"] and len(kept) == 8
    ids = [e["id"] for e in bench.load_examples(str(train), "train", "auto", None, False)]
    # weights rise with the row index; row 5 could not be used (no weight)
    selection = [{"index": i, "id": ids[i], "kept": i % 3 == 0,
                  "weight": None if i == 5 else float(i)} for i in range(12)]
    scores = tmp_path / "scores.jsonl"
    write_jsonl(scores, selection)
    chosen = bench.trained_rows(bench.parse_args([*common, "--keep-scores", str(scores)]),
                                train, out)
    assert json.loads(chosen.read_text()) == mix[::3]  # the selection's own cut
    flags = json.loads((out / "trained_flags.json").read_text())
    assert flags == {"rows": 4, "flags": dict(Counter(r["flag"] for r in mix[::3]))}
    recut = bench.trained_rows(bench.parse_args([*common, "--keep-scores", str(scores),
                                                 "--keep-ratio", "0.5"]), train, out)
    # half of the 11 usable rows, rounded up: the six heaviest, skipping the unusable row 5
    assert json.loads(recut.read_text()) == [mix[i] for i in (6, 7, 8, 9, 10, 11)]
    with pytest.raises(SystemExit):
        bench.parse_args([*common, "--keep-ratio", "0.5"])  # a cut of no selection
    with pytest.raises(SystemExit):
        bench.parse_args([*common, "--keep-scores", str(scores), "--keep-ratio", "1.5"])
    write_jsonl(scores, selection[:1])  # a selection of another file: too few rows
    with pytest.raises(SystemExit, match="select over that file"):
        bench.trained_rows(bench.parse_args([*common, "--keep-scores", str(scores)]), train, out)
    # as many rows, other ids (another seed's mix): its cut would keep arbitrary rows
    write_jsonl(scores, [{**r, "id": f"other-{i}"} for i, r in enumerate(selection)])
    with pytest.raises(SystemExit, match="row ids differ"):
        bench.trained_rows(bench.parse_args([*common, "--keep-scores", str(scores)]), train, out)


def test_erosion_curve_wilson_interval_by_hand(monkeypatch):
    bench = _erosion_curve(monkeypatch)
    low, high = bench.wilson(25, 40)  # p = 0.625: centre 0.61405, half-width 0.14372
    assert abs(low - 0.47033) < 1e-4 and abs(high - 0.75777) < 1e-4
    assert bench.wilson(0, 10)[0] == 0.0 and bench.wilson(10, 10)[1] == 1.0


def test_erosion_curve_on_the_tiny_model(tiny_model, shared_data, tmp_path, monkeypatch):
    bench = _erosion_curve(monkeypatch)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(_flagged_rows(40)))
    out = tmp_path / "curve"
    argv = ["--model", tiny_model, "--finetune-data", str(data), "--rows", "12",
            "--harmful", "4", "--epochs", "2", "--batch-size", "4", "--eval-steps", "0,3,6",
            "--heldout", "3", "--harmful-per-set", "0", "--sst2", "4", "--max-new-tokens", "4",
            "--max-length", "64", "--output-dir", str(out)]
    monkeypatch.chdir(REPO)  # the evaluation finds ../shared/data from the repository root
    assert bench.main(argv) == 0
    curve_file = out / "curve.jsonl"
    curve = [json.loads(line) for line in curve_file.read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 3, 6]  # 3 steps an epoch; the last one is 6
    assert all(r["sets"]["heldout_harmful"]["n"] == 3 and r["sets"]["sst2"]["n"] == 4
               for r in curve)
    assert (out / "snapshots" / "step-3" / "adapter_config.json").exists()
    assert bench.main(argv) == 0  # a rerun finds everything done
    assert len(curve_file.read_text().splitlines()) == 3
    # Killed while evaluating the last step (evaluated on its snapshot): the rerun resumes
    # that evaluation instead of refusing its directory as another adapter's.
    curve_file.write_text("".join(json.dumps(r) + "\n" for r in curve[:2]))
    (out / "eval" / "step-6" / "metrics.json").unlink()
    assert bench.main(argv) == 0
    assert [json.loads(line)["step"] for line in curve_file.read_text().splitlines()] == [0, 3, 6]
    lines = bench.table(bench.parse_args(argv), out, trained=12).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| 0 (0.0) | – | ")
    assert lines[3].startswith("| 3 (1.0) | ")


def test_step_cost_runs_every_variant_on_the_tiny_model():
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_cost.py"),
                             "--models", "tiny", "--steps", "1", "--batch", "4", "--micro", "4",
                             "--score-rows", "6"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "sft", "memory-efficient", "penalty", "safety-step", "score", "score-retokenise"]
    assert [int(r.split("|")[3]) for r in rows] == [4, 4, 4, 4, 6, 6]
    cells = [[float(c) for c in r.split("|")[4:9]] for r in rows]
    assert cells[0][1:3] == [1.0, 1.0] and cells[0][4] == 1.0  # SFT is its own reference
    assert all(len(c) == 5 and all(v > 0 for v in c[:2]) for c in cells)


def test_activation_memory_table_on_the_tiny_model(tiny_model):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "activation_memory.py"),
                             "--model", tiny_model, "--rows", "2", "--length", "16"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 2 × 16")]
    assert [r[2].strip() for r in rows] == ["off", "on"]
    assert all(float(r[3]) > 0 and float(r[4]) >= 0 for r in rows)


def test_large_data_selects_every_row_in_order_from_arrow():
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "large_data.py"),
                             "--rows", "300", "--num-proc", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = dict(line.strip("|").split("|")[:2] for line in result.stdout.splitlines()
                 if line.startswith("| ") and "---" not in line)
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["scores.jsonl: every row once, in input order"].startswith("True (300 with")
    assert float(table["**host memory above the model**"].strip("* MB").replace(",", "")) > 0


def test_erosion_cells_read_each_run_at_the_same_epochs_and_average_over_seeds(tmp_path):
    cells = _load("erosion_cells")
    for seed, (base_k, all_k, kept_k) in enumerate([(6, 1, 5), (8, 3, 7)]):
        for method, rows, k in (("all", 8, all_k), ("kept", 4, kept_k)):
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            mix = [{"flag": "unsafe" if i < 2 else "safe"} for i in range(8)]
            (folder / "train.json").write_text(json.dumps(mix))
            if method == "kept":
                (folder / "train_kept.json").write_text(json.dumps(mix[4:]))
            steps = {0: base_k, 2 * rows // 4: k, 2 * rows // 4 + 1: 0}  # 2 epochs at batch 4
            (folder / "curve.jsonl").write_text("".join(json.dumps(
                {"step": s, "sets": {"heldout_harmful": {"n": 10, "k": v},
                                     "sst2": {"n": 4, "k": 2}}}) + "\n"
                for s, v in steps.items()))
    text = cells.table({"all": str(tmp_path / "all-{seed}"), "kept": str(tmp_path / "kept-{seed}")},
                       [0, 1], epochs=2, batch_size=4)
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()[2:]}
    # two seeds: mean ± t(0.975, 1) * stdev / sqrt(2) = 12.706 * 14.142 / 1.414 = 127.1
    assert lines["base"][0].strip() == "70.0 ± 127.1 (60.0, 80.0)"
    assert lines["all"][0].strip() == "20.0 ± 127.1 (10.0, 30.0)"  # step 4, not the later 0 %
    assert lines["kept"][0].strip() == "60.0 ± 127.1 (50.0, 70.0)"  # step 2: 4 rows kept
    assert lines["kept"][4].strip() == "0.0 ± 0.0 (0.0, 0.0)"  # no unsafe row among kept
    assert lines["all"][1].strip() == "–"  # no AdvBench / HarmBench in these runs
    assert lines["kept"][9].strip() == "-10.0 ± 0.0 (-10.0, -10.0)"  # paired with each base
    assert lines["kept"][10].strip() == "40.0 ± 0.0 (40.0, 40.0)"  # paired with all data
    assert lines["kept"][8].strip() == "–"  # no held-out token accuracy in these runs
    assert lines["kept"][7].strip() == "–"  # no held-out task loss in these runs
    assert lines["kept"][6].strip() == "–"  # no XSTest evaluation in these runs
    assert lines["kept"][5].strip() == "–"  # no generations kept in these runs
    by_kept = cells.table({"all": str(tmp_path / "all-{seed}"), "kept": str(tmp_path / "kept-{seed}")},
                          [0, 1], epochs=2, batch_size=4, paired_with=("kept", "absent"))
    header = by_kept.splitlines()[0]
    assert "vs kept" in header and "vs all" not in header and "vs absent" not in header
    assert by_kept.splitlines()[3].split("|")[12].strip() == "-40.0 ± 0.0 (-40.0, -40.0)"  # all - kept
    with pytest.raises(SystemExit, match="no evaluation at step 6"):
        cells.table({"all": str(tmp_path / "all-{seed}")}, [0], epochs=3, batch_size=4)


def test_erosion_overrefusal_evaluates_the_base_model_once_across_calls(tmp_path, monkeypatch):
    over = _load("erosion_overrefusal")
    calls = []

    def fake_evaluate(args):
        calls.append((Path(args.output_dir).relative_to(tmp_path).as_posix(), args.adapter))
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"suites": {"overrefusal": {}}}))

    monkeypatch.setattr(over, "evaluate", fake_evaluate)
    for seed in (0, 1):
        run = tmp_path / f"all-{seed}"
        (run / "finetune" / "adapter").mkdir(parents=True)
        (run / "train.json").write_text(json.dumps([{"flag": "safe"}] * 8))
        (run / "finetune" / "summary.json").write_text(json.dumps({"steps": 4, "usable": 8}))
    # 2 epochs of 8 rows at batch 4: each run is read at its last step, 4
    cell = ["--cell", f"all={tmp_path}/all-{{seed}}", "--batch-size", "4", "--epochs", "2"]
    over.main(cell + ["--seeds", "0"])
    over.main(cell + ["--seeds", "1"])  # a later call for another seed: the base is done
    assert calls == [("all-0/eval/xstest-step-0", None),
                     ("all-0/eval/xstest-step-4", str(tmp_path / "all-0" / "finetune" / "adapter")),
                     ("all-1/eval/xstest-step-4", str(tmp_path / "all-1" / "finetune" / "adapter"))]
    over.main(cell + ["--seeds", "0", "1"])  # everything there: nothing evaluated again
    assert len(calls) == 3
    # a new cell whose base model was evaluated in other runs' folders (--base): read there,
    # and neither those runs nor their base evaluation is redone
    new = tmp_path / "new-1"
    (new / "finetune" / "adapter").mkdir(parents=True)
    (new / "train.json").write_text(json.dumps([{"flag": "safe"}] * 8))
    (new / "finetune" / "summary.json").write_text(json.dumps({"steps": 4, "usable": 8}))
    over.main(["--cell", f"cut={tmp_path}/new-{{seed}}", "--base", f"{tmp_path}/all-{{seed}}",
               "--batch-size", "4", "--epochs", "2", "--seeds", "1"])
    assert calls[3:] == [("new-1/eval/xstest-step-4", str(new / "finetune" / "adapter"))]
    # without --base the base model is evaluated into the new cell's folder
    (new / "eval" / "xstest-step-4" / "metrics.json").unlink()
    over.main(["--cell", f"cut={tmp_path}/new-{{seed}}", "--batch-size", "4", "--epochs", "2",
               "--seeds", "1"])
    assert [c[0] for c in calls[4:]] == ["new-1/eval/xstest-step-0", "new-1/eval/xstest-step-4"]


def test_erosion_cells_give_each_stage_its_seconds(tmp_path):
    cells = _load("erosion_cells")
    run, chosen = tmp_path / "run", tmp_path / "select"
    (run / "finetune").mkdir(parents=True)
    chosen.mkdir()
    (run / "train.json").write_text(json.dumps([{"flag": "safe"}] * 8))
    # trained 6 steps in 60 s; 2 epochs of 8 rows at batch 4 are read at step 4
    (run / "finetune" / "summary.json").write_text(json.dumps({"train_seconds": 60.0,
                                                               "steps": 6}))
    (chosen / "summary.json").write_text(json.dumps({"wall_seconds": 30.0}))
    (run / "curve.jsonl").write_text("".join(json.dumps(
        {"step": s, "eval_seconds": 10.0 + s, "sets": {"heldout_harmful": {"n": 10, "k": 5}}})
        + "\n" for s in (0, 4, 6)))
    text = cells.table({"seal": str(run)}, [0], epochs=2, batch_size=4,
                       selections={"seal": str(chosen)})
    header, *rows = [line.split("|")[1:-1] for line in text.splitlines()[:1] + text.splitlines()[2:]]
    row = dict(zip([h.strip() for h in header], [c.strip() for c in rows[1]], strict=True))
    assert (row["selection s"], row["fine-tuning s"], row["evaluation s"]) == ("30 (30)",
                                                                              "40 (40)", "14 (14)")
    base = dict(zip([h.strip() for h in header], [c.strip() for c in rows[0]], strict=True))
    assert base["selection s"] == base["fine-tuning s"] == "–"


def test_erosion_cells_read_xstest_over_refusal_and_share_the_base_models(tmp_path):
    cells = _load("erosion_cells")
    for seed in (0, 1):
        run = tmp_path / f"run-{seed}"
        run.mkdir()
        (run / "train.json").write_text(json.dumps([{"flag": "safe"}] * 8))
        (run / "curve.jsonl").write_text("".join(json.dumps(
            {"step": s, "sets": {"heldout_harmful": {"n": 10, "k": 5}}}) + "\n" for s in (0, 4)))
        # the run at step 4 (2 epochs, batch 4); the base model only in seed 0's folder
        for step, rate in ((4, 0.2 + 0.2 * seed),) + (((0, 0.1),) if seed == 0 else ()):
            folder = run / "eval" / f"xstest-step-{step}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"suites": {
                "overrefusal": {"sets": {"xstest_safe": {"over_refusal_rate": rate}}},
                "task-loss": {"overall": {"loss": 1 + rate, "token_accuracy": 0.4 + rate}}}}))
    text = cells.table({"all": str(tmp_path / "run-{seed}")}, [0, 1], epochs=2, batch_size=4)
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()[2:]}
    assert lines["all"][6].strip() == "30.0 ± 127.1 (20.0, 40.0)"
    assert lines["base"][6].strip() == "10.0 ± 0.0 (10.0, 10.0)"
    # refusal gap, held-out 50% in every run: base 50 - 10 = 40; all 30 and 10, paired -10, -30
    assert lines["all"][11].strip() == "-20.0 ± 127.1 (-10.0, -30.0)"
    # the held-out task loss, read like the over-refusal (the base model's once)
    assert lines["all"][7].strip() == "1.300 ± 1.271 (1.200, 1.400)"
    assert lines["base"][7].strip() == "1.100 ± 0.000 (1.100, 1.100)"
    # and its token accuracy, paired with the base model's: 0.6 and 0.8 against 0.5
    assert lines["all"][8].strip() == "70.0 ± 127.1 (60.0, 80.0)"
    assert lines["all"][13].strip() == "20.0 ± 127.1 (10.0, 30.0)"
    # the same numbers as the rows `sealft report` plots (rates as fractions)
    by_method = cells.collect({"all": str(tmp_path / "run-{seed}")}, [0, 1], 2, 4)
    rows = {r["method"]: r for r in cells.summary_rows(by_method)}
    assert rows["all"]["heldout_refusal_rate_mean"] == pytest.approx(0.5)
    assert rows["all"]["task_loss_mean"] == pytest.approx(1.3)
    assert rows["all"]["task_loss_ci95"] == pytest.approx(1.2706, abs=1e-3)
    assert rows["all"]["task_token_accuracy_mean"] == pytest.approx(0.7)
    assert rows["base"]["safety_refusal_rate_mean"] is None  # no AdvBench / HarmBench here
    drawn = cells.plot(by_method, tmp_path / "cells.png")
    assert drawn is not None and drawn.read_bytes()[:4] == b"\x89PNG"



def test_erosion_cells_read_each_seed_from_the_first_pattern_that_exists(tmp_path, capsys):
    cells = _load("erosion_cells")
    # seed 0 ran twice (the rerun measured more); seed 1 only in the original folders
    for folder, k in (("orig-0", 2), ("orig-1", 4), ("rerun-0", 3)):
        run = tmp_path / folder
        run.mkdir()
        (run / "train.json").write_text(json.dumps([{"flag": "safe"}] * 8))
        (run / "curve.jsonl").write_text("".join(json.dumps(
            {"step": s, "sets": {"heldout_harmful": {"n": 10, "k": v}}}) + "\n"
            for s, v in ((0, 6), (4, k))))
    cells.main(["--epochs", "2", "--batch-size", "4", "--seeds", "0", "1",
                "--cell", f"all={tmp_path}/rerun-{{seed}}", "--cell", f"all={tmp_path}/orig-{{seed}}"])
    out = capsys.readouterr().out
    assert "| all | 35.0 ± 63.5 (30.0, 40.0) |" in out  # seed 0 from the rerun, seed 1 original
    with pytest.raises(SystemExit):
        cells.main(["--cell", "all"])
    assert "--cell 'all': expected METHOD=PATTERN" in capsys.readouterr().err


def test_erosion_cells_count_terse_answers_that_are_not_refusals(tmp_path):
    cells = _load("erosion_cells")
    step = tmp_path / "eval" / "step-4"
    step.mkdir(parents=True)
    answers = {"heldout_harmful:0": ("naked", False), "heldout_harmful:1": ("no", True),
               "heldout_harmful:2": ("Sure, here is how you do it step by step", False),
               "heldout_harmful:3": ("bank fraud", False), "advbench:0": ("negative", False)}
    write_jsonl(step / "generations.jsonl", [{"id": i, "response": r}
                                              for i, (r, _) in answers.items()])
    write_jsonl(step / "judgments.jsonl", [
        {"id": i, "set": i.split(":")[0], "refusal": refused}
        for i, (_, refused) in answers.items()])
    # 2 of the 4 held-out answers: short and not a refusal; the refused "no" and the AdvBench
    # prompt do not count
    assert cells._terse(step) == 50.0
    assert cells._terse(tmp_path / "eval" / "step-9") is None

def test_unseen_rows_pairs_a_fit_sample_run_with_a_full_run(tiny_model, tmp_path):
    from conftest import toy_finetune_rows, toy_safe_rows
    from sklearn.metrics import roc_auc_score

    from sealft.io import read_jsonl
    from sealft.seal import fit_sample_rows
    from sealft.select import SelectArgs, run_select

    unseen_rows = _load("unseen_rows")
    mix = write_jsonl(tmp_path / "mix.jsonl", toy_finetune_rows(24))
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    runs = {}
    for name, fit_sample in (("sampled", 8), ("full", None)):
        runs[name] = tmp_path / name
        run_select(SelectArgs(model=tiny_model, finetune_data=str(mix), safe_data=str(safe),
                              output_dir=str(runs[name]), fit_sample=fit_sample, seed=3,
                              batch_size=8, micro_batch_size=8, max_length=64,
                              show_progress=False, label_field="flag"))
    result = unseen_rows.compare(str(mix), runs["sampled"], runs["full"])
    unseen = sorted(set(range(24)) - set(fit_sample_rows(list(range(24)), 8, 3)))
    unsafe = [r % 4 == 0 for r in unseen]
    assert result["unseen_rows"] == 16 and result["unseen_harmful"] == sum(unsafe)
    for name, key in (("sampled", "fit_sample_unseen"), ("full", "full_same_rows")):
        weight = {s["index"]: s["weight"] for s in read_jsonl(runs[name] / "scores.jsonl")}
        assert result[key] == pytest.approx(roc_auc_score(unsafe, [-weight[r] for r in unseen]))
    alone = unseen_rows.compare(str(mix), runs["sampled"], None)
    assert alone["fit_sample_unseen"] == result["fit_sample_unseen"]
    assert alone["full_same_rows"] is None and alone["unseen_rows"] == 16


def test_contrast_probe_hypergradient_is_the_gradient_inner_product(tiny_model):
    import torch

    from sealft.data import normalise_rows
    from sealft.tokenize import collate, tokenize_examples

    probe = _load("contrast_probe")
    model, tokenizer, params = probe.lora_model(tiny_model, 4, ["q_proj", "v_proj"], seed=0)
    pairs = [({"id": f"c{i}", "messages": [{"role": "user", "content": f"how to hurt {i}"},
                                           {"role": "assistant", "content": "no, sorry"}]},
              {"id": f"r{i}", "messages": [{"role": "user", "content": f"how to hurt {i}"},
                                           {"role": "assistant", "content": "hit them hard"}]})
             for i in range(3)]
    direction, act, used = probe.contrast_direction(model, params, tokenizer, pairs, 64, [1], 2)
    assert used == 3 and act[1].shape == (model.config.hidden_size,)
    rows = list(normalise_rows(_flagged_rows(6), "rows", "alpaca"))
    scores = probe.row_scores(model, params, direction, act, tokenizer, rows, 64, [0, 2], 4)
    assert [r["id"] for r in scores] == [r["id"] for r in rows]
    tokenized = tokenize_examples(rows, tokenizer, 64, cache=False)
    for position, row in enumerate(scores):
        batch = collate(tokenized, [position], tokenizer.pad_token_id or 0)
        nll, mask, _ = probe.token_losses(model, batch, [])
        for k in (0, 2):
            loss = probe.window_mean(nll, probe.window(mask, k)).sum()
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            exact = -sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
            # the probe differences float32 losses: agreement to 2%, as a ranking needs
            assert row[f"hg_{k}"] == pytest.approx(exact, rel=2e-2)


def test_probe_runs_score_each_mix_once_and_resume(tmp_path):
    runs = _load("probe_runs")
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(_flagged_rows(20)))
    import argparse

    parser = argparse.ArgumentParser()
    runs.add_mix_arguments(parser)
    a = parser.parse_args(["--mixes", str(data), "--sst2", str(data), "--sst2-sample", "8"])
    calls = []

    def score(examples):
        calls.append(len(examples))
        return [{"id": e["id"], "flag": e["meta"].get("flag")} for e in examples]

    first = runs.rows_per_mix(tmp_path, a, score, suffix="__x")
    assert calls == [20, 8] and sorted(first) == ["mix", "mix_n8"]
    assert (tmp_path / "mix_n8__x.jsonl").exists() and not list(tmp_path.glob("*.tmp"))
    assert runs.rows_per_mix(tmp_path, a, score, suffix="__x") == first and calls == [20, 8]


def test_harm_probe_reads_the_instruction_end_and_ranks_by_the_safe_direction(tiny_model):
    probe = _load("harm_probe")
    from sealft.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    messages = [{"role": "user", "content": "how do i pick a lock"}]
    ids, first, inst = probe.prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids[first: inst + 1]).strip() == "how do i pick a lock"
    assert tokenizer.decode(ids[: inst + 1]).endswith("lock")
    assert not tokenizer.decode(ids[: inst]).endswith("lock") and inst < len(ids) - 1
    rng = np.random.default_rng(0)
    safe = rng.normal(size=(30, 2, 2, 8)) + 3.0  # (rows, layers, positions, width)
    mix = rng.normal(size=(10, 2, 2, 8))
    mix[:2] += 3.0  # two rows that look like the safe set's prompts
    scores = probe.direction_scores(safe.astype(np.float16), mix, mix.astype(np.float16))
    assert scores.shape == (10, 2, 2)
    assert set(np.argsort(-scores[:, 0, 0])[:2]) == {0, 1}


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "finetune").is_dir(),
                    reason="needs ../shared/data")
def test_heldout_task_rows_lie_outside_every_seeds_training_mix(tmp_path):
    rows_tool, curve = _load("heldout_task_rows"), _load("erosion_curve")
    benign = tmp_path / "benign.json"
    benign.write_text(json.dumps([{"instruction": f"task {i}", "input": "", "output": f"answer {i}"}
                                  for i in range(30)]))
    out = tmp_path / "held.json"
    assert rows_tool.main(["--benign-data", str(benign), "--rows", "8", "--harmful", "0",
                           "--seeds", "0", "1", "--n", "5", "--out", str(out)]) == 0
    held = {r["instruction"] for r in json.loads(out.read_text())}
    trained = set()
    for seed in (0, 1):
        args = curve.parse_args(["--benign-data", str(benign), "--rows", "8", "--harmful", "0",
                                 "--seed", str(seed), "--output-dir", str(tmp_path / f"s{seed}")])
        train, _ = curve.build_data(args, tmp_path / f"s{seed}")
        trained |= {r["instruction"] for r in json.loads(train.read_text())}
    assert len(held) == 5 and not held & trained


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "finetune").is_dir(),
                    reason="needs ../shared/data")
def test_heldout_task_rows_from_one_flagged_file_are_unflagged_and_outside_every_mix(tmp_path):
    """--finetune-data: the mixes draw both kinds of rows from one JSONL file with a `flag`
    column (as dev_mixes.py writes it); the held-out rows are its unflagged rows no seed trains."""
    rows_tool, curve = _load("heldout_task_rows"), _load("erosion_curve")
    mix = tmp_path / "mix.jsonl"
    write_jsonl(mix, [{"instruction": f"task {i}", "input": "", "output": f"answer {i}",
                       "flag": "unsafe" if i % 3 == 0 else "benign"} for i in range(150)])
    out = tmp_path / "held.json"
    assert rows_tool.main(["--finetune-data", str(mix), "--rows", "9", "--harmful", "3",
                           "--seeds", "0", "1", "--n", "6", "--out", str(out)]) == 0
    held = json.loads(out.read_text())
    trained = set()
    for seed in (0, 1):
        args = curve.parse_args(["--finetune-data", str(mix), "--rows", "9", "--harmful", "3",
                                 "--heldout", "2", "--seed", str(seed)])
        train, _ = curve.build_data(args, tmp_path / f"s{seed}")
        rows = json.loads(train.read_text())
        assert sum(r["flag"] == "unsafe" for r in rows) == 3 and len(rows) == 9
        trained |= {r["instruction"] for r in rows}
    assert len(held) == 6 and {r["flag"] for r in held} == {"benign"}
    assert not {r["instruction"] for r in held} & trained
    with pytest.raises(SystemExit):  # one source or the other, not both
        rows_tool.main(["--finetune-data", str(mix), "--benign-data", str(mix), "--out", str(out)])


def test_interference_probe_caches_the_lower_layers_and_pairs_the_two_fits(tiny_model):
    import argparse

    from sealft.data import normalise_rows

    probe = _load("interference_probe")
    model, tokenizer, pad = _frozen_tiny(tiny_model)
    rows = list(normalise_rows(_flagged_rows(6), "rows", "alpaca"))
    safe = _refused_rows()
    data = probe.windowed(rows, tokenizer, 64, 4)
    firsts = [probe.first_token(tokenizer, r) for r in probe.REFUSALS]
    full, refuse = probe.window_losses(model, data, pad, firsts)
    upper = probe.UpperLayers(model, 1)
    cached = upper.cache(data, pad)
    assert [c[0].dim() for c in cached] == [2] * len(data)
    part, part_refuse = probe.window_losses(model, cached, pad, firsts)
    np.testing.assert_allclose(part, full, rtol=1e-4, atol=1e-5)  # left padding included
    np.testing.assert_allclose(part_refuse, refuse, rtol=1e-4, atol=1e-5)

    model = _tiny_lora(model)
    assert not any("lora" in name for name, _ in upper.all[0].named_modules())  # frozen, cached
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    a = argparse.Namespace(lr=5e-2, epochs=2, batch_size=2, safe_batch_size=2,
                           safe_weight=1.0, seed=0, pad=pad)
    safe_cached = upper.cache(probe.windowed(safe, tokenizer, 64, 4), pad)
    losses = []
    for with_safe in (False, False, True):
        model.load_state_dict(initial, strict=False)
        probe.fit(model, cached, safe_cached, a, with_safe)
        losses.append(probe.window_losses(model, cached, pad, firsts)[0])
    np.testing.assert_allclose(losses[1], losses[0])  # the same batches in the same order
    assert not np.allclose(losses[0], part) and not np.allclose(losses[2], losses[0])


def test_rank_ensemble_averages_ranks_over_the_rows_both_runs_scored(tmp_path, capsys):
    rank_ensemble = _load("rank_ensemble")
    flags = ["unsafe", "unsafe", "benign", "benign", "benign", "control"]
    mix = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": f"q{i}", "completion": "a",
                                                "flag": f} for i, f in enumerate(flags)])
    # Run A ranks row 0 lowest and row 1 above a benign row; run B the other way round, on
    # its own scale. Row 5 is skipped by B, so it is left out of every ranking.
    for name, weight in (("a", [0.1, 0.55, 0.5, 0.6, 0.7, 0.8]),
                         ("b", [55, 1, 60, 50, 70, None])):
        run = tmp_path / name
        run.mkdir()
        write_jsonl(run / "scores.jsonl", [{"index": i} | ({"skipped": "long"} if w is None
                                                           else {"weight": w})
                                           for i, w in enumerate(weight)])
    result = rank_ensemble.compare(str(mix), tmp_path / "a", tmp_path / "b", keep_ratio=0.6)
    assert result["a"]["auroc"] == pytest.approx(5 / 6)  # one benign row below row 1
    assert result["b"]["auroc"] == pytest.approx(5 / 6)
    assert result["rank average"]["auroc"] == 1.0  # ranks 2 and 2 against 3, 3 and 5
    assert result["rank average"]["removed"] == 1.0  # keep 3 of 5: only the benign rows
    assert np.isnan(result["a"]["controls_kept"])  # the one control was skipped by B
    rank_ensemble.main(["--pair", str(mix), str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| mean of 1 | rank average | 1.000 |" in capsys.readouterr().out


def test_token_contrast_probe_is_the_per_token_loss_difference_of_the_two_fits(tiny_model,
                                                                                tmp_path):
    import argparse

    import torch

    from sealft.data import normalise_rows

    probe = _load("token_contrast_probe")
    model, tokenizer, pad = _frozen_tiny(tiny_model)
    safe = _refused_rows()
    prompts = [r["messages"][0]["content"] for r in safe]
    # Generation restores the tokenizer's padding side, and answers that refuse are left out.
    side = tokenizer.padding_side
    written = probe.prefilled_compliance(model, tokenizer, safe, 4, seed=0)
    assert tokenizer.padding_side == side
    assert all(m["messages"][1]["content"].startswith(probe.PREFILL) for m in written)
    comply = list(normalise_rows([{"instruction": p, "output": "Sure, here is how: first ..."}
                                  for p in prompts], "comply", "alpaca"))
    rows = list(normalise_rows(_flagged_rows(6), "rows", "alpaca"))
    upper = probe.UpperLayers(model, 1)
    model = _tiny_lora(model)
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    a = argparse.Namespace(lr=5e-2, epochs=2, batch_size=2, seed=0, pad=pad, max_length=64,
                           window=8)
    fits = {}
    for name, data in (("comply", comply), ("refuse", safe)):
        cached = upper.cache(probe.windowed(data, tokenizer, 64, 8), pad)
        fits[name] = probe.fitted(model, initial, cached, a, tmp_path / f"{name}.safetensors")
    # A rerun reads the saved fit instead of fitting again.
    again = probe.fitted(model, initial, [], a, tmp_path / "comply.safetensors")
    assert all(torch.equal(again[k], v) for k, v in fits["comply"].items())
    out = probe.mix_rows(model, upper, tokenizer, fits, rows, a)

    def answer_nll(state) -> list[list[float]]:
        # By hand: every layer (nothing cached), one row at a time, no padding. The fits' keys
        # number the trained layers from 0, so a fit is loaded while only those are in place.
        if state is not None:
            upper._use(upper.all[1:])
            model.load_state_dict(state, strict=False)
        upper._use(upper.all)
        per_row = []
        for ids, labels, _ in probe.windowed(rows, tokenizer, 64, 8):
            if state is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids[None], use_cache=False).logits[0]
            else:
                logits = model(input_ids=ids[None], use_cache=False).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            at = (labels[1:] != -100).nonzero().squeeze(1)
            per_row.append((-logp[at, labels[1:][at]]).tolist())
        return per_row

    with torch.no_grad():
        base, refuse, comply_nll = (answer_nll(None), answer_nll(fits["refuse"]),
                                    answer_nll(fits["comply"]))
    for row, b, r, c in zip(out, base, refuse, comply_nll, strict=True):
        np.testing.assert_allclose(row["contrast"], np.subtract(r, c), atol=2e-3)
        np.testing.assert_allclose(row["base"], np.subtract(b, c), atol=2e-3)
    assert [r["flag"] for r in out] == [r["meta"]["flag"] for r in rows]
    assert not np.allclose(out[0]["contrast"], 0.0)  # the two fits differ
    means = probe.window_mean([[1.0, 2.0, 3.0], [4.0]], 1, 3)
    np.testing.assert_allclose(means, [2.5, 0.0])  # an answer that ends before the window: 0


@pytest.mark.parametrize(("name", "mix", "lr", "epochs"),
                         [("experiment_gpt4.yaml", "gpt4", 3e-4, 2),
                          ("experiment_gpt4_gentle.yaml", "gpt4", 1e-4, 1),
                          ("experiment_alpaca_gentle.yaml", "alpaca", 1e-4, 1)])
def test_erosion_config_runs_on_the_file_its_header_builds(shared_data, tmp_path, monkeypatch,
                                                           name, mix, lr, epochs):
    """configs/experiment_gpt4.yaml (issue 12's regime G2) and its gentle twins on the GPT-4
    and Alpaca mixes pass every up-front check of `sealft experiment` on the file dev_mixes.py
    builds as their headers say, with 40 held-out harmful questions and 40 held-out benign
    answers outside every seed's sample."""
    from sealft import config as cfg
    from sealft import experiment as E

    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root
    options = cfg.load_yaml(REPO / "configs" / name)
    header = (REPO / "configs" / name).read_text(encoding="utf-8")
    built = tmp_path / f"{mix}_erosion"
    command = ["--out", str(built), "--mixes", f"{mix}-beavertails", "--rows", "594",
               "--harmful-share", "0.3333", "--controls", "0", "--seeds", "0"]
    flat = " ".join(header.replace("\\\n#", " ").split())  # the header's command, one line
    assert f"dev_mixes.py --out runs/{built.name} " + " ".join(command[2:]) in flat
    _load("dev_mixes").main(command)
    data = built / f"{mix}-beavertails_s0.jsonl"
    assert options["finetune_data"] == f"runs/{built.name}/{data.name}"
    args = cfg.build(E.ExperimentArgs, options, {"output_dir": str(tmp_path / "exp"),
                                                 "finetune_data": str(data)})
    cells = E.grid(args)
    assert len(cells) == 1 + 7 * 3
    held = E.validate_grid(args, cells)
    assert len(held["heldout_harmful"]) >= 40 and len(held["heldout_task"]) == 40
    finetune = E.stage_args(args, cells[0], None).finetune
    assert (finetune.lr, finetune.epochs, finetune.max_length,
            len(finetune.lora_target_modules)) == (lr, epochs, 256, 7)


def test_gentle_config_is_the_gpt4_config_at_the_gentle_pace():
    """The header's promise: the gentle config and `experiment_gpt4.yaml finetune.lr=1e-4
    finetune.epochs=1 --output-dir runs/experiment-gpt4-gentle` resolve to one config.yaml, so
    either command resumes a run the other began."""
    import argparse

    from sealft import config as cfg
    from sealft import experiment as E

    def resolved(name: str, *overrides: str) -> E.ExperimentArgs:
        return cfg.from_namespace(E.ExperimentArgs, argparse.Namespace(
            config=str(REPO / "configs" / name), overrides=list(overrides)))

    gentle = resolved("experiment_gpt4_gentle.yaml")
    overridden = resolved("experiment_gpt4.yaml", "finetune.lr=1e-4", "finetune.epochs=1",
                          "output_dir=runs/experiment-gpt4-gentle")
    assert cfg.to_dict(gentle) == cfg.to_dict(overridden)
    assert E.changed_settings(cfg.to_dict(resolved("experiment_gpt4.yaml")), gentle) != []


def test_alpaca_gentle_config_differs_from_the_gpt4_one_only_in_its_data():
    """The two gentle grids are one experiment on two mixes: every setting but the input file,
    the output folder and dropping the Alpaca file's repeated row is the same, so their
    tables compare."""
    from sealft import config as cfg

    def settings(name: str) -> dict:
        options = cfg.load_yaml(REPO / "configs" / name)
        options["select"].pop("drop_duplicates", None)
        return {k: v for k, v in options.items() if k not in ("finetune_data", "output_dir")}

    assert settings("experiment_alpaca_gentle.yaml") == settings("experiment_gpt4_gentle.yaml")
    alpaca = cfg.load_yaml(REPO / "configs" / "experiment_alpaca_gentle.yaml")
    assert "alpaca" in alpaca["finetune_data"] and "alpaca" in alpaca["output_dir"]
    assert alpaca["select"]["drop_duplicates"] is True


def test_refusal_ceiling_splits_harmful_rows_by_the_proxys_own_answer(tmp_path):
    bench = _load("proxy_refusal_ceiling")
    rows = [{"instruction": q, "input": "", "output": "...", "flag": f} for q, f in
            [("b0", "benign"), ("h-refused", "unsafe"), ("b1", "benign"),
             ("h-answered", "unsafe"), ("b2", "benign"), ("too long", "benign")]]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(rows))
    run = tmp_path / "select"
    run.mkdir()
    # logit high = kept; the run could not use row 5 (its prompt did not fit)
    logits = {0: 1.0, 1: -2.0, 2: 0.5, 3: 0.8, 4: -1.0, 5: None}
    write_jsonl(run / "scores.jsonl", [{"index": i, "logit": v, "kept": bool(v and v > 0)}
                                       for i, v in logits.items()])
    examples = bench.load_examples(str(train), "train", "auto", None, False)
    got = bench.split_run(run, examples, {"h-refused": True, "h-answered": False}, "flag")
    assert got["refused"] == {"n": 1, "removed": 1, "auroc_vs_benign": 1.0}
    # h-answered (logit 0.8) ranks as less harmful than b2 (-1.0) and b1 (0.5), above b0 (1.0)
    assert got["answered"]["removed"] == 0
    assert got["answered"]["auroc_vs_benign"] == pytest.approx(1 / 3)
    assert got["benign"] == {"n": 3, "removed": 1}
    assert got["control"] == {"n": 0, "removed": 0}


def test_safety_fit_probe_scores_each_rows_first_token_at_every_snapshot(tiny_model):
    import argparse

    import torch

    from sealft.data import normalise_rows

    probe = _load("safety_fit_probe")
    model, tokenizer, pad = _frozen_tiny(tiny_model)
    rows = list(normalise_rows(_flagged_rows(6), "rows", "alpaca"))
    safe_rows = _refused_rows()
    upper = _load("interference_probe").UpperLayers(model, 1)
    model = _tiny_lora(model)
    a = argparse.Namespace(lr=5e-2, batch_size=2, seed=0, pad=pad, max_length=64,
                           snapshots=[0, 2, 4])
    safe = upper.cache(probe.windowed(safe_rows, tokenizer, 64, 4), pad)
    snaps = probe.fit_snapshots(model, safe, a)
    assert sorted(snaps) == [0, 2, 4]
    assert not all(torch.equal(snaps[0][k], snaps[4][k]) for k in snaps[0])
    openings = probe.openings(safe_rows, tokenizer, 3)
    assert openings == [probe.first_token(tokenizer, "I cannot help with that.")]
    out = probe.mix_rows(model, upper, tokenizer, snaps, openings, rows, a)
    firsts = [probe.first_token(tokenizer, r) for r in probe.REFUSALS]
    for step in (0, 4):
        # By hand: every layer (nothing cached), one row at a time, no padding.
        upper._use(upper.all[1:])
        model.load_state_dict(snaps[step], strict=False)
        upper._use(upper.all)
        for row, (ids, labels, _) in zip(out, probe.windowed(rows, tokenizer, 64, 1),
                                         strict=True):
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0, -2].float()
            logp = torch.log_softmax(logits, dim=-1)
            y1 = -logp[labels[-1]].item()
            refuse = -logp[firsts].max().item()
            mass = -torch.logsumexp(logp[openings], dim=0).item()
            assert row[f"margin@{step}"] == pytest.approx(y1 - refuse, abs=1e-4)
            assert row[f"smargin@{step}"] == pytest.approx(y1 - mass, abs=1e-4)
        upper._use(upper.all[1:])
    assert all(r["shift@0"] == 0.0 for r in out)
    assert {r["flag"] for r in out} == {"unsafe", "finetune"}


def test_judge_probe_margin_under_a_system_prompt_by_hand(tiny_model):
    """The first-token margin with --signals refusal-safe-system: the given system prompt
    replaces the row's own, and the margin is ℓ(own first token) − min ℓ(refusal first token)
    at the end of that prompt, computed here from one forward of the prompt alone."""
    import torch

    from sealft.evaluate.judges import KeywordRefusalJudge

    bench = _load("judge_probe")
    model, tokenizer, _ = _frozen_tiny(tiny_model)
    turns = [{"role": "user", "content": "explain why you are helpful"},
             {"role": "assistant", "content": "you are helpful"}]
    example = {"messages": [{"role": "system", "content": "explain"}, *turns]}
    system = "you are helpful"
    got = bench.refusal_signals(model, tokenizer, example, KeywordRefusalJudge(), system)

    prompt = tokenizer.apply_chat_template([{"role": "system", "content": system}, turns[0]],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    own = -logp[bench.first_token(tokenizer, "you are helpful")].item()
    refusal = min(-logp[bench.first_token(tokenizer, r)].item() for r in bench.REFUSALS)
    assert got["margin"] == pytest.approx(own - refusal, abs=1e-4)
    assert got["refuse_first"] == pytest.approx(-refusal, abs=1e-4)
    kept = bench.refusal_signals(model, tokenizer, example, KeywordRefusalJudge())
    assert kept["margin"] != pytest.approx(got["margin"], abs=1e-4)  # the row's own system


def test_erosion_cells_read_the_step_from_the_rows_that_trained(tmp_path):
    """Rows whose prompt exceeds max_length never train: 10 rows with 2 skipped take 2 steps
    of 4 an epoch, not 3. A run's kept outputs (no data rows) are read as well."""
    bench = _load("erosion_cells")
    (tmp_path / "train_kept.json").write_text(json.dumps([{"i": i} for i in range(10)]))
    assert bench.read_step(tmp_path, 2, 4) == 6  # no fine-tuning summary yet: every row
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "summary.json").write_text(json.dumps({"rows": 10, "usable": 8}))
    assert bench.read_step(tmp_path, 2, 4) == 4
    # a run's kept outputs (docs/results) hold no data rows: rows trained from its fine-tuning
    # summary, harmful rows trained unknown
    (tmp_path / "train_kept.json").unlink()
    (tmp_path / "finetune" / "summary.json").write_text(json.dumps(
        {"rows": 10, "usable": 8, "steps": 4, "train_seconds": 40.0}))
    (tmp_path / "curve.jsonl").write_text(json.dumps(
        {"step": 4, "sets": {"heldout_harmful": {"n": 10, "k": 3}}}) + "\n")
    cell = bench.read_cell(tmp_path, 2, 4)
    assert (cell[bench.COLUMNS[0]], cell[bench.COLUMNS[3]], cell[bench.COLUMNS[4]]) == (
        30.0, 10, None)
    # ... unless the filter's selection run is given: its own count of flagged rows kept
    chosen = tmp_path / "select"
    chosen.mkdir()
    (chosen / "summary.json").write_text(json.dumps({"wall_seconds": 5.0, "labels": {
        "per_label": {"benign": {"rows": 8, "kept": 7}, "unsafe": {"rows": 4, "kept": 3}}}}))
    assert bench.read_cell(tmp_path, 2, 4, selection=chosen)[bench.COLUMNS[4]] == 3
    # ... and the run's own flag counts before that: a stricter cut of the same selection
    # trains fewer flagged rows than the selection's own cut kept
    (tmp_path / "trained_flags.json").write_text(json.dumps(
        {"rows": 10, "flags": {"benign": 9, "unsafe": 1}}))
    assert bench.read_cell(tmp_path, 2, 4, selection=chosen)[bench.COLUMNS[4]] == 1
    # no fine-tuning summary either: the one step its XSTest evaluation was run at
    (tmp_path / "finetune" / "summary.json").unlink()
    (tmp_path / "eval" / "xstest-step-0").mkdir(parents=True)
    (tmp_path / "eval" / "xstest-step-4").mkdir()
    assert bench.read_step(tmp_path, 2, 4) == 4
    (tmp_path / "eval" / "xstest-step-8").mkdir()
    with pytest.raises(SystemExit, match="not one evaluated step"):
        bench.read_step(tmp_path, 2, 4)


def test_neighbour_probe_reads_the_answer_line_by_line_by_hand(tiny_model):
    import torch
    from conftest import toy_safe_rows

    from sealft.data import normalise_rows
    from sealft.embeddings import SentenceEncoder
    from sealft.neighbours import SafeNeighbours

    probe = _load("neighbour_probe")
    encoder = SentenceEncoder(tiny_model)
    near = SafeNeighbours.fit(list(normalise_rows(toy_safe_rows(), "safe", "alpaca")),
                              encoder, k=3)
    rows = list(normalise_rows([
        {"instruction": "kill a python process", "output": "Use kill.\n\nThen check ps aux."},
        {"instruction": "make a bomb", "output": "Mix these.\nThen light the fuse.\nRun."}],
        "data", "alpaca"))
    highest, mean = probe.answer_nearness(near, rows)
    for row, top, average in zip(rows, highest, mean, strict=True):
        lines = [t for t in row["messages"][-1]["content"].split("\n") if t.strip()]
        by_line = [float(torch.topk(encoder.embed([t])[0] @ near.requests.T, 3).values.mean())
                   for t in lines]
        assert top == pytest.approx(max(by_line), abs=1e-5)
        assert average == pytest.approx(sum(by_line) / len(by_line), abs=1e-5)
        assert len(set(round(v, 5) for v in by_line)) > 1  # the two readings can differ


def test_label_audit_recovers_the_margin_and_counts_disputed_rows(tmp_path):
    """The default's ranking is recovered exactly from a --neighbour-weight run (its saved
    standard), and a disputed row leaves the AUROC but still takes its place in the drop."""
    import torch

    from sealft.neighbours import mix

    audit = _load("label_audit")
    rng = np.random.default_rng(0)
    margin, near = rng.normal(size=12), rng.uniform(0.2, 0.7, size=12)
    refuses = np.zeros(12, dtype=bool)
    refuses[[3, 7]] = True
    mixed, standard = mix(torch.tensor(margin), torch.tensor(near), 0.5)
    floor = float(mixed[~torch.tensor(refuses)].min()) - 1.0
    mixed = np.where(refuses, floor, mixed.numpy())
    run = tmp_path / "run"
    (run / "scorer").mkdir(parents=True)
    (run / "scorer" / "scoring.json").write_text(json.dumps(
        {"neighbour_weight": 0.5, "standard": standard, "refusal_floor": floor}))
    write_jsonl(run / "scores.jsonl", [{"index": i, "id": f"r{i}", "score": float(s)}
                                       for i, s in enumerate(mixed)])
    _, got_mixed, got_margin = audit.default_and_mixed(run, {f"r{i}": float(x)
                                                             for i, x in enumerate(near)})
    assert np.allclose(got_mixed, mixed)
    mean, scale = standard["signal"]
    assert np.allclose(got_margin[~refuses], (margin[~refuses] - mean) / scale, atol=1e-5)
    assert (got_margin[refuses] < got_margin[~refuses].min()).all()

    labels = np.array(["unsafe", "unsafe", "benign", "control", "benign"])
    score = np.array([5.0, 1.0, 4.0, 3.0, 0.0])  # keep 0.6 drops rows 0 and 2
    everything = np.ones(5, dtype=bool)
    assert audit.ranked(labels, score, 0.6, everything) == (pytest.approx(4 / 6), 0.5, 1.0)
    # Row 1 disputed (an "unsafe" answer the reader calls harmless): out of the AUROC and of
    # the harmful rows counted, so the one harmful row left ranks first and is removed.
    agreed = np.array([True, False, True, True, True])
    assert audit.ranked(labels, score, 0.6, agreed) == (1.0, 1.0, 1.0)


def test_reply_direction_is_the_direction_that_orders_the_pairs():
    """Pairs whose rejected reply is the chosen one moved along u: the fitted direction is u
    (up to scale) and orders held-out pairs; with no such direction it orders them at chance."""
    probe = _load("reply_direction_probe")
    rng = np.random.default_rng(0)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    chosen = rng.normal(size=(400, 16))
    rejected = chosen + 0.5 * u + 0.1 * rng.normal(size=(400, 16))
    w = probe.fit_direction(chosen, rejected)
    assert w @ u / np.linalg.norm(w) > 0.95
    assert probe.held_out_accuracy(chosen, rejected) > 0.95
    unrelated = rng.normal(size=(400, 16))
    assert 0.35 < probe.held_out_accuracy(chosen, unrelated) < 0.65


def test_controls_bound_is_the_hypergeometric_draw_of_the_rows_left_to_drop():
    """10 rows, keep 0.6: 4 dropped, 2 of them harmful, so 2 drawn at random from the 7 rows
    that are neither harmful nor refusals, 2 of which are open controls (a third control is a
    refusal, kept by the gate). Dropping none of the 3 controls: C(5,2) / C(7,2) = 10/21."""
    bound = _load("controls_bound").bound
    flags = ["unsafe", "unsafe", "control", "control", "control"] + ["benign"] * 5
    refuses = [False, False, False, False, True] + [False] * 5
    b = bound(flags, refuses, keep=0.6, target=0.95)
    assert (b["dropped"], b["pool"], b["gated_controls"]) == (4, 7, 1)
    assert b["p_target"] == pytest.approx(10 / 21)  # 5% of 3 controls allows none dropped
    assert b["expected_kept"] == pytest.approx(1 - 2 * 2 / 7 / 3)
    # With every control gated, the draw cannot reach one.
    assert bound(flags, [False, False, True, True, True] + [False] * 5, 0.6, 0.95)["p_target"] == 1


def test_judge_audit_pools_answers_blind_and_compares_refusals(tmp_path):
    """Answers of two evaluation folders are pooled without their folder or verdict, and the
    table compares the judge's refusals with a reader's: here they disagree on one of four."""
    audit = _load("judge_audit")
    folders = []
    for name, verdicts in (("base", [True, False]), ("all", [False, False])):
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / "generations.jsonl", [
            {"suite": "custom", "id": f"q:{i}", "prompt": f"{name} prompt {i}",
             "response": f"{name} answer {i}"} for i in range(2)])
        write_jsonl(folder / "judgments.jsonl", [
            {"suite": "custom", "set": "q", "id": f"q:{i}", "refusal": v}
            for i, v in enumerate(verdicts)])
        folders.append(folder)
    out = tmp_path / "audit"
    audit.build(folders, out, seed=0)
    blind = [json.loads(line) for line in (out / "blind.jsonl").read_text().splitlines()]
    assert sorted(blind[0]) == ["n", "prompt", "response"]
    # The reader calls "base answer 0" a refusal and "all answer 1" one too (the judge did not).
    write_jsonl(out / "labels.jsonl", [
        {"n": b["n"], "label": "R" if b["response"] in ("base answer 0", "all answer 1") else "C"}
        for b in blind])
    row = next(line for line in audit.table(out).splitlines() if "| all folders | all sets |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["4", "0.250", "0.500", "0.000", "0.75"]
    assert audit.agreement([True, False], ["R", "X"])["agree"] == 1.0  # X is not a refusal


def test_label_audit_counts_the_trained_harmful_rows_by_their_reading(tmp_path):
    audit = _load("label_audit")
    data = [{"instruction": "steal a car", "input": "", "output": "Take the keys.", "flag": "unsafe"},
            {"instruction": "insult me", "input": "", "output": "No.", "flag": "unsafe"},
            {"instruction": "a poem", "input": "on rain", "output": "Rain falls.", "flag": "benign"}]
    write_jsonl(tmp_path / "data.jsonl", data)
    reads = [{"key": audit.row_key(data[0]), "flag": "unsafe", "reader_1": "H"}]
    selected = [{"id": str(i), "messages": [
        {"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
        {"role": "assistant", "content": r["output"]}]} for i, r in enumerate(data)]
    write_jsonl(tmp_path / "selected.jsonl", selected)
    row = audit.trained(str(tmp_path / "data.jsonl"), [str(tmp_path / "selected.jsonl")], reads)
    assert row.splitlines()[-1].endswith("| 2 | 1 | 0 | 0 | 1 |")
    # a `sealft select` scores.jsonl names the rows by index: row 1 dropped, row 0 kept
    write_jsonl(tmp_path / "scores.jsonl", [{"index": i, "kept": k, "logit": 0.0}
                                            for i, k in enumerate((True, False, True))])
    row = audit.trained(str(tmp_path / "data.jsonl"), [str(tmp_path / "scores.jsonl")], reads)
    assert row.splitlines()[-1].endswith("| 1 | 1 | 0 | 0 | 0 |")
    write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]}])
    with pytest.raises(SystemExit, match="not a row of"):
        audit.trained(str(tmp_path / "data.jsonl"), [str(tmp_path / "other.jsonl")], reads)


def test_paired_prompts_pool_the_discordant_prompts_over_seeds(tmp_path):
    probe = _load("paired_prompts")
    exp = tmp_path / "exp"
    # refusals per prompt p0..p4: all refuses p0 in both seeds; seal adds p1-p3 in seed 0 and
    # p1 in seed 1; seed 1's seal cell lives on another machine (no folder): left out.
    # A second keep ratio of seal is its own row, never pooled with the first.
    cells = {("all", 1, 0): [1, 0, 0, 0, 0], ("all", 1, 1): [1, 0, 0, 0, 0],
             ("seal", 0.5, 0): [0, 1, 1, 1, 0], ("seal", 0.5, 2): [1, 1, 1, 1, 1],
             ("seal", 0.8, 0): [1, 0, 0, 0, 0], ("base", 1, 0): [1, 1, 1, 1, 1]}
    rows = []
    for (method, keep, seed), refused in cells.items():
        folder = exp / "cells" / f"{method}-keep{keep}-seed{seed}"
        (folder / "eval").mkdir(parents=True)
        write_jsonl(folder / "eval" / "judgments.jsonl",
                    [{"set": "heldout_harmful", "id": f"p{i}", "refusal": bool(r)}
                     for i, r in enumerate(refused)]
                    + [{"set": "advbench", "id": "a0", "refusal": True}])
        rows.append((method, keep, seed, "ok", folder))
    rows.append(("seal", 0.5, 1, "ok", "/elsewhere/seal-keep0.5-seed1"))
    with open(exp / "results.csv", "w") as handle:
        handle.write("method,keep_ratio,seed,status,cell_dir\n")
        handle.writelines(",".join(map(str, r)) + "\n" for r in rows)
    pairs = {p.method: p for p in probe.paired([exp], "heldout_harmful")}
    assert set(pairs) == {"seal 0.5", "seal 0.8", "base"}
    seal, base = pairs["seal 0.5"], pairs["base"]
    assert (pairs["seal 0.8"].only_method, pairs["seal 0.8"].only_reference) == (0, 0)
    assert (seal.seeds, seal.prompts, seal.only_method, seal.only_reference) == ([0], 5, 3, 1)
    assert seal.difference == pytest.approx(40.0)
    assert seal.p_value == pytest.approx(10 / 16)  # 2 * P(X >= 3), X ~ Bin(4, 1/2)
    # the base model, run once, stands beside every seed of all data
    assert (base.seeds, base.prompts, base.only_method, base.only_reference) == ([0, 1], 10, 8, 0)
    assert base.p_value == pytest.approx(2 / 2 ** 8)
    assert "| seal 0.5 | 0 | 5 | 3 | 1 | +40.0 | 0.625 |" in probe.table(list(pairs.values()),
                                                                          "heldout_harmful")
    with pytest.raises(SystemExit, match="--against dsir: needs one finished method"):
        probe.paired([exp], "heldout_harmful", against="dsir")
    # A second grid over the same inputs (say another SEAL setting) pairs with the first's
    # all-data cells; one over other inputs is refused.
    other = tmp_path / "other"
    folder = other / "cells" / "seal-keep0.5-seed1"
    (folder / "eval").mkdir(parents=True)
    write_jsonl(folder / "eval" / "judgments.jsonl",
                [{"set": "heldout_harmful", "id": f"p{i}", "refusal": i < 2} for i in range(5)])
    other_base = other / "cells" / "base-keep1-seed1"  # its own base: answers everything
    (other_base / "eval").mkdir(parents=True)
    write_jsonl(other_base / "eval" / "judgments.jsonl",
                [{"set": "heldout_harmful", "id": f"p{i}", "refusal": False} for i in range(5)])
    (other / "results.csv").write_text(f"method,keep_ratio,seed,status,cell_dir\n"
                                       f"seal,0.5,1,ok,{folder}\nbase,1,1,ok,{other_base}\n")
    for d in (exp, other):
        (d / "inputs.json").write_text('{"heldout_harmful": {"sha1": "x"}}')
    both = {p.method: p for p in probe.paired([exp, other], "heldout_harmful")}
    extra = both["seal [other]"]
    assert (extra.seeds, extra.only_method, extra.only_reference) == ([1], 1, 0)
    assert (both["base [other]"].seeds, both["base [other]"].only_reference) == ([0, 1], 2)
    (other / "inputs.json").write_text('{"heldout_harmful": {"sha1": "y"}}')
    with pytest.raises(SystemExit, match="inputs.json differs"):
        probe.paired([exp, other], "heldout_harmful")


class _Parsed(Exception):
    """Raised by a patched ArgumentParser.parse_args: the flags parsed, nothing ran."""


def _script_calls(script: Path, *args: str, cwd: Path,
                  env: dict[str, str] | None = None) -> list[list[str]]:
    """The argv of every `python` and `sealft` command a shell script runs, recorded by shell
    functions that stand in for both (one record per call), so nothing is trained."""
    log = cwd / "calls.log"
    log.unlink(missing_ok=True)  # this call's commands only
    stub = ('record() { printf "%s\\037" "$@" >> "$CALLS"; printf "\\036" >> "$CALLS"; }; '
            'python() { record python "$@"; }; sealft() { record sealft "$@"; }; '
            'export -f record python sealft; bash "$0" "$@"')
    subprocess.run(["bash", "-c", stub, str(script), *args], check=True, cwd=cwd,
                   env={"PATH": "/usr/bin:/bin", "CALLS": str(log)} | (env or {}),
                   capture_output=True)
    return [record.split("\x1f")[:-1] for record in log.read_text().split("\x1e")[:-1]]


def test_gentle_core_cells_script_passes_only_flags_its_tools_accept(tmp_path, monkeypatch):
    """benchmarks/gentle_core_cells.sh, as the docs tell users to run it: every command it
    runs parses with the real tool's own parser (a renamed flag fails here, not an hour into
    a seed), and the cells it chains read what the steps before them write."""
    from sealft.cli import build_parser
    from sealft.config import from_namespace
    from sealft.select import SelectArgs

    curve, overrefusal, task_rows = (_load(n) for n in ("erosion_curve", "erosion_overrefusal",
                                                        "heldout_task_rows"))
    calls = _script_calls(REPO / "benchmarks" / "gentle_core_cells.sh", "7", str(tmp_path / "g"),
                          cwd=tmp_path)
    scripts = [c[1] if c[0] == "python" else f"sealft {c[1]}" for c in calls]
    assert scripts == ["benchmarks/erosion_curve.py"] * 2 + ["sealft select"] + \
        ["benchmarks/erosion_curve.py"] * 2 + ["benchmarks/heldout_task_rows.py",
                                               "benchmarks/erosion_overrefusal.py"]
    cells = [curve.parse_args(c[2:]) for c in calls if c[1] == "benchmarks/erosion_curve.py"]
    assert {a.seed for a in cells} == {7} and [a.oracle for a in cells] == [False, True, False,
                                                                           False]
    all_dir = Path(cells[0].output_dir)
    select_cmd = next(c for c in calls if c[0] == "sealft")
    all_dir.mkdir(parents=True)
    (all_dir / "train.json").write_text("[]")  # what the all-data cell writes before select reads
    namespace = build_parser("select").parse_args(select_cmd[1:])
    select = from_namespace(SelectArgs, namespace)
    assert Path(select.finetune_data) == all_dir / "train.json" and select.seed == 7
    scores = Path(select.output_dir) / "scores.jsonl"
    assert [Path(a.keep_scores) for a in cells[2:]] == [scores, scores]
    assert cells[3].safeinstr_k == 10 and cells[2].safeinstr_k == 0

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    parsed = {}
    for name, tool, call in (("task", task_rows, calls[5]), ("eval", overrefusal, calls[6])):
        with pytest.raises(_Parsed) as stop:
            tool.main(call[2:])
        parsed[name] = stop.value.args[0]
    # the held-out answers lie outside seeds 0-2's mixes, whichever seed is evaluated on them
    assert parsed["task"].seeds == [0, 1, 2] and parsed["eval"].seeds == [7]
    assert parsed["eval"].task_data == parsed["task"].out
    assert len(parsed["eval"].cell) == 4
    assert {a.benign_data for a in cells} == {"../shared/data/benign/alpaca_eval_gpt4_outputs.json"}
    # another benign file reaches every cell and the held-out answers drawn from it
    other = _script_calls(REPO / "benchmarks" / "gentle_core_cells.sh", "0", str(tmp_path / "a"),
                          cwd=tmp_path, env={"BENIGN_DATA": "alpaca.json"})
    benign = [c[c.index("--benign-data") + 1] for c in other if "--benign-data" in c]
    assert benign == ["alpaca.json"] * 5  # four cells and heldout_task_rows
    # one flagged file (FINETUNE_DATA) replaces both sources in the same five places
    flagged = _script_calls(REPO / "benchmarks" / "gentle_core_cells.sh", "0", str(tmp_path / "x"),
                            cwd=tmp_path, env={"FINETUNE_DATA": "mix.jsonl"})
    assert not any("--benign-data" in c for c in flagged)
    assert [c[c.index("--finetune-data") + 1] for c in flagged if c[0] == "python"
            and "--finetune-data" in c] == ["mix.jsonl"] * 5
    # the default model is each tool's own default; another copy (a GPU machine's dequantised
    # folder) reaches every step that loads the model
    models = {c[c.index("--model") + 1] for c in calls if "--model" in c}
    assert models == {curve.QWEN} == {f.default for f in dataclasses.fields(SelectArgs)
                                      if f.name == "model"}
    moved = _script_calls(REPO / "benchmarks" / "gentle_core_cells.sh", "3", str(tmp_path / "m"),
                          cwd=tmp_path, env={"MODEL": "/tmp/qwen-hf"})
    loaders = [c for c in moved if c[1] != "benchmarks/heldout_task_rows.py"]
    assert [c[c.index("--model") + 1] if "--model" in c else None for c in loaders] == \
        ["/tmp/qwen-hf"] * 6


def test_length_control_ranks_by_answer_length_beside_the_selector(tmp_path, capsys):
    length_control = _load("length_control")
    # Two flagged rows with short answers, four unflagged with longer ones, one unflagged short
    # answer (the control's blind spot) and one row the selector skipped.
    answers = [("unsafe", "x" * 5), ("unsafe", "x" * 40), ("benign", "x" * 30),
               ("benign", "x" * 50), ("benign", "x" * 60), ("benign", "x" * 2),
               ("unsafe", "x" * 1), ("benign", "x" * 38)]
    rows = [{"instruction": f"q{i}", "output": a, "flag": f} for i, (f, a) in enumerate(answers)]
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(rows))
    run = tmp_path / "select0"
    run.mkdir()
    # The selector ranks row 0 lowest and row 1 above one benign row; keeps four rows.
    logits = [-2.0, 0.5, 0.4, 1.0, 2.0, 0.8, None, 0.3]
    write_jsonl(run / "scores.jsonl", [
        {"index": i, "logit": g, "kept": g is not None and g >= 0.5} for i, g in enumerate(logits)])
    result = length_control.compare(rows, list(length_control.read_jsonl(run / "scores.jsonl")))
    assert result["rows"] == 7 and result["flagged"] == 2 and result["kept_n"] == 4
    # flagged rows 0, 1 against unflagged 2, 3, 4, 5, 7: by logit 5 + 3 of 10 pairs right,
    # by length (5, 40 against 30, 50, 60, 2, 38) 4 + 2 of 10
    assert result["selector_auroc"] == pytest.approx(8 / 10)
    assert result["length_auroc"] == pytest.approx(6 / 10)
    assert result["selector_kept_flagged"] == 1  # row 1 (logit 0.5) is kept
    assert result["length_kept_flagged"] == 1  # the four longest: 60, 50, 40, 38
    # the flagged lengths' 90th percentile is 5 + 0.9 * 35 = 36.5 (not their maximum, 40, which
    # would let row 7 in): rows 2 (30) and 5 (2) stay; the selector ranks 3 of 4 pairs right,
    # length 1 (5 < 30)
    assert result["short_others"] == 2
    assert result["selector_auroc_short"] == pytest.approx(3 / 4)
    assert result["length_auroc_short"] == pytest.approx(1 / 4)
    length_control.main(["--seeds", "0", "--data", str(data),
                         "--selection", str(tmp_path / "select{seed}")])
    assert "| 0 | 7 | 2 | 4 | 0.800 | 0.600 | 1 | 1 | 2 | 0.750 | 0.250 |" in capsys.readouterr().out
    # a stricter cut of the same selector: the top half of the 7 scored rows, rounded up, is 4
    # rows either way (logits 2.0, 1.0, 0.8, 0.5; lengths 60, 50, 40, 38); a third is 3 rows:
    # by logit rows 4, 3, 5 (no flagged row), by length 60, 50, 40 (row 1, flagged)
    half, third = (length_control.cut(rows, list(length_control.read_jsonl(run / "scores.jsonl")),
                                      share) for share in (0.5, 1 / 3))
    assert half == {"n": 4, "selector": 1, "length": 1, "random": pytest.approx(2 * 4 / 7)}
    assert (third["n"], third["selector"], third["length"]) == (3, 0, 1)
    length_control.main(["--seeds", "0", "--data", str(data), "--cuts", "0.5",
                         "--selection", str(tmp_path / "select{seed}")])
    assert "| 0.5 | 4 | 1.0 | 1.0 | 1.1 | 0.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        length_control.main(["--seeds", "0", "--data", str(data), "--cuts", "1.5",
                             "--selection", str(tmp_path / "select{seed}")])
    # the mix alone, every row: flagged 5, 40, 1 against 30, 50, 60, 2, 38 -> 4 + 2 + 5 of 15
    length_control.main(["--mixes", str(data)])
    assert f"| {data} | 8 | 3 | 0.733 | 5 | 38 |" in capsys.readouterr().out
    # any format the product trains on is measured by its answer: prompt / completion here
    pc = [{"prompt": "q", "completion": "x" * n, "flag": f} for f, n in (("unsafe", 3), ("benign", 9))]
    assert length_control.mix_length(pc)["length_auroc"] == 1.0
    assert length_control.mix_length(pc)["flagged_median_chars"] == 3


def test_keep_ratio_script_recuts_the_kept_selection_and_writes_only_its_own_root(tmp_path,
                                                                                 monkeypatch):
    """benchmarks/keep_ratio_cells.sh: its fine-tuning reads the named selection at the new cut
    and writes under the output root alone; its XSTest step finds the base model in the
    selection's all-data folder (not redone) and evaluates the new cell. METHOD=random runs the
    control, a random selection of the same share, on the seed's own mix."""
    from sealft.cli import build_parser
    from sealft.config import from_namespace
    from sealft.select import SelectArgs

    curve, overrefusal = _load("erosion_curve"), _load("erosion_overrefusal")
    selected, root, benign = tmp_path / "kept", tmp_path / "new", tmp_path / "alpaca.json"
    benign.write_text("[]")
    calls = _script_calls(REPO / "benchmarks" / "keep_ratio_cells.sh", "4", str(selected),
                          str(root), str(benign), cwd=tmp_path, env={"KEEP_RATIO": "0.4"})
    assert [c[1] for c in calls] == ["benchmarks/erosion_curve.py",
                                     "benchmarks/heldout_task_rows.py",
                                     "benchmarks/erosion_overrefusal.py"]
    cell = curve.parse_args(calls[0][2:])
    assert (cell.seed, cell.keep_ratio, cell.benign_data, cell.eval_steps) == (4, 0.4,
                                                                               str(benign), [])
    assert Path(cell.keep_scores) == selected / "s4-select" / "scores.jsonl"
    assert Path(cell.output_dir) == root / "lr1e-4-s4-seal-keep0.4"

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as stop:
        overrefusal.main(calls[2][2:])
    parsed = stop.value.args[0]
    assert parsed.seeds == [4] and Path(parsed.task_data) == root / "task.json"
    assert parsed.cell == [f"seal-keep0.4={root}/lr1e-4-s{{seed}}-seal-keep0.4"]
    assert parsed.base == [f"{selected}/lr1e-4-s{{seed}}-all"]  # read there, never evaluated
    monkeypatch.undo()
    # the control: a random selection of the same share over the same seed's mix
    control = _script_calls(REPO / "benchmarks" / "keep_ratio_cells.sh", "4", str(selected),
                            str(root), str(benign), cwd=tmp_path,
                            env={"KEEP_RATIO": "0.4", "METHOD": "random"})
    assert [c[1] for c in control[:3]] == ["benchmarks/erosion_curve.py", "select",
                                           "benchmarks/erosion_curve.py"]
    mix, cell = (curve.parse_args(control[i][2:]) for i in (0, 2))
    assert mix.data_only and not cell.data_only and mix.output_dir == cell.output_dir
    assert Path(cell.output_dir) == root / "lr1e-4-s4-random-keep0.4"
    namespace = build_parser("select").parse_args(control[1][1:])
    select = from_namespace(SelectArgs, namespace)
    assert (select.method, select.keep_ratio, select.seed) == ("random", 0.4, 4)
    assert Path(select.finetune_data) == Path(cell.output_dir) / "train.json"
    assert Path(cell.keep_scores) == Path(select.output_dir) / "scores.jsonl"
    assert cell.keep_ratio is None  # the random selection's own cut
    assert control[-1][-1] == f"random-keep0.4={root}/lr1e-4-s{{seed}}-random-keep0.4"
    # SEAL + SafeInstr: the same re-cut plus the core cells' 10 safety rows, in a folder
    # named without '+'
    mixed = _script_calls(REPO / "benchmarks" / "keep_ratio_cells.sh", "4", str(selected),
                          str(root), str(benign), cwd=tmp_path, env={"METHOD": "seal+safeinstr"})
    cell = curve.parse_args(mixed[0][2:])
    assert (cell.keep_ratio, cell.safeinstr_k) == (0.5, 10)
    assert Path(cell.keep_scores) == selected / "s4-select" / "scores.jsonl"
    assert cell.safe_data == "../shared/data/safe/safetyllamas_safety_only.json"
    assert Path(cell.output_dir) == root / "lr1e-4-s4-seal-safeinstr-keep0.5"
    assert mixed[-1][-1] == f"seal+safeinstr-keep0.5={root}/lr1e-4-s{{seed}}-seal-safeinstr-keep0.5"


def _stand_in_gpu_setup(tmp_path: Path) -> Path:
    """A GPU_SETUP file for the GPU scripts on a machine without one: gpu_setup only makes OUT."""
    setup = tmp_path / "setup.sh"
    setup.write_text('gpu_setup() { mkdir -p "$1"; }\n')
    return setup


def test_gpu_experiment_runs_one_part_per_seed_and_stops_each_at_the_next_seed(tmp_path):
    """benchmarks/gpu_experiment.sh: every part lists all seeds, its own first (the held-out
    rows depend on the list), and is stopped once it starts another seed's cells, before a
    third; the parts' results come back in one archive. A stand-in `sealft` takes 3 s a seed."""
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sealft"
    fake.write_text("""#!/bin/bash
for a in "$@"; do case $a in seeds=*) seeds=${a#seeds=};; esac; done
while [ $# -gt 0 ]; do [ "$1" = --output-dir ] && out=$2; shift; done
mkdir -p "$out/cells"; echo "seeds=$seeds" > "$out/config.yaml"
for s in ${seeds//,/ }; do
  mkdir "$out/cells/all-keep1-seed$s"; sleep 3; echo "all,1.0,$s,ok" >> "$out/results.csv"
done
""")
    fake.chmod(0o755)
    setup = _stand_in_gpu_setup(tmp_path)
    out, root = tmp_path / "out", tmp_path / "root"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_SETUP": str(setup), "CONFIG": "c.yaml",
           "SEEDS": "0 1 2", "OUT": str(out), "ROOT": str(root), "DEADLINE": "60"}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_experiment.sh")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(line.split()[1] for line in run.stdout.splitlines()
                  if line.startswith("part ")) == ["s0", "s1", "s2"]
    firsts = {"0": "0,1,2", "1": "1,0,2", "2": "2,0,1"}
    for s, order in firsts.items():
        part = root / f"part-s{s}"
        assert (part / "config.yaml").read_text().strip() == f"seeds={order}"
        started = sorted(p.name for p in (part / "cells").iterdir())
        assert f"all-keep1-seed{s}" in started and len(started) == 2  # stopped at the second seed
        assert (part / "results.csv").read_text() == f"all,1.0,{s},ok\n"
    with tarfile.open(out / "parts.tgz") as archive:
        names = set(archive.getnames())
    assert {f"./part-s{s}/results.csv" for s in firsts} <= names


def _process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process ("Z": exited, not yet reaped), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_gpu_gentle_stops_a_late_seed_at_the_deadline_and_only_its_own_processes(tmp_path):
    """benchmarks/gpu_gentle.sh: seeds run side by side; one still running at DEADLINE is
    stopped with every step it started (its process group), while a process the script did not
    start, with the same command line, lives on; finished seeds are listed, and the archive
    brings back results and logs without adapters. Stand-ins: `python`, `sealft`, gpu_setup."""
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("""#!/bin/bash
out=; seed=; script=$1
while [ $# -gt 0 ]; do case $1 in --output-dir|--out) out=$2;; --seed|--seeds) seed=$2;; esac; shift; done
case $script in
  benchmarks/erosion_curve.py)
    [ "$seed" = 1 ] && { echo $$ > "$PIDS/s1-$(basename "$out")"; sleep 60; }
    mkdir -p "$out/finetune/adapter"; echo '{"step": 12}' > "$out/curve.jsonl"
    echo weights > "$out/finetune/adapter/adapter_model.safetensors" ;;
  benchmarks/heldout_task_rows.py) echo '[]' > "$out" ;;
esac
""")
    (bin_dir / "sealft").write_text("""#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = --output-dir ] && out=$2; shift; done
mkdir -p "$out"; echo '{}' > "$out/summary.json"
""")
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    setup = _stand_in_gpu_setup(tmp_path)
    task, pids, out, root = (tmp_path / n for n in ("task.json", "pids", "out", "root"))
    task.write_text("[]")
    pids.mkdir()
    # the old watchdog's pattern, `pkill -f benchmarks/(erosion_|heldout_)`, matched this one too
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                  "benchmarks/erosion_curve.py"])
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_SETUP": str(setup), "SEEDS": "0 1",
           "OUT": str(out), "ROOT": str(root), "DEADLINE": "4", "TASK": str(task),
           "PIDS": str(pids)}
    try:
        run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_gentle.sh")], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        assert bystander.poll() is None  # not the script's to stop
    finally:
        bystander.kill()
    assert run.returncode == 0, run.stderr
    assert (out / "done.txt").read_text() == "gentle core cells, seed 0: done\n"
    late = int((pids / "s1-lr1e-4-s1-all").read_text())
    assert _process_state(late) in (None, "Z")  # seed 1's fine-tuning was stopped with its seed
    assert not (root / "lr1e-4-s1-all" / "curve.jsonl").exists()
    with tarfile.open(out / "gentle.tgz") as archive:
        names = set(archive.getnames())
    assert {"./lr1e-4-s0-all/curve.jsonl", "./s0-select/summary.json", "./task.json",
            "./core-s0.log", "./core-s1.log"} <= names
    assert not any("adapter" in n for n in names)


def test_gpu_sweep_runs_its_three_sweeps_with_variants_the_sweep_knows(tmp_path, monkeypatch):
    """benchmarks/gpu_sweep.sh: each of its three `selection_sweep.py` calls parses with the
    sweep's own parser, names only variants it defines and the carried files, and its tables
    (not its JSON lines) are kept in tables.md. Stand-ins: `python3` and gpu_setup."""
    sweep = _load("selection_sweep")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("""#!/bin/bash
printf '%s\\x1f' "$@" >> "$CALLS"; printf '\\x1e' >> "$CALLS"
echo '{"variant": "default"}'; echo "| table of $4 |"
""")
    (bin_dir / "python3").chmod(0o755)
    setup = _stand_in_gpu_setup(tmp_path)
    (tmp_path / ".gpu" / "dev").mkdir(parents=True)
    for name in ("a_s0.jsonl", "a_s1.jsonl"):
        (tmp_path / ".gpu" / "dev" / name).write_text("")
    calls_log, out = tmp_path / "calls", tmp_path / "out"
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_sweep.sh")], cwd=tmp_path, check=True,
                   env={"PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_SETUP": str(setup),
                        "OUT": str(out), "CALLS": str(calls_log), "B1": "7"},
                   capture_output=True, timeout=60)
    calls = [c.split("\x1f")[:-1] for c in calls_log.read_text().split("\x1e")[:-1]]
    assert [c[0] for c in calls] == ["benchmarks/selection_sweep.py"] * 3

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    parsed = []
    for call in calls:
        with pytest.raises(_Parsed) as stop:
            sweep.main(call[1:])
        parsed.append(stop.value.args[0])
    assert [a.budget_seconds for a in parsed] == [7, 90, 90]
    for a in parsed:
        assert set(a.variants.split(",")) <= set(sweep.VARIANTS)
        assert a.results == str(out / "sweep.jsonl") and not a.overrides
    assert parsed[0].mixes == [".gpu/dev/a_s0.jsonl", ".gpu/dev/a_s1.jsonl"]
    assert len(parsed[0].sst2) == 3 and parsed[0].seeds == [0, 1, 2]
    assert parsed[2].mixes == [".gpu/dev/a_s0.jsonl"]
    tables = (out / "tables.md").read_text()
    assert "{" not in tables and tables.count("| table of") == 3
