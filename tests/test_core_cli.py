"""The real command line on a tiny random Llama: `sealft run` writes the whole output tree;
user errors exit with code 2 and one line that names the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml


def sealft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealft", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_run_writes_the_output_tree(tiny_model, toy_data, tmp_path):
    finetune_data, safe_data = toy_data
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": tiny_model,
        "select": {"finetune_data": finetune_data, "safe_data": safe_data, "epochs": 2,
                   "batch_size": 8, "micro_batch_size": 4, "gamma_start": 0.1,
                   "label_field": "flag", "show_progress": False},
        "finetune": {"epochs": 1, "batch_size": 8, "show_progress": False},
    }))
    out = tmp_path / "run"
    result = sealft("run", "--config", str(config), f"output_dir={out}",
                    "select.keep_ratio=0.75")
    assert result.returncode == 0, result.stderr[-2000:]
    select = out / "select"
    for name in ("scores.jsonl", "selected.jsonl", "selector.safetensors", "config.yaml",
                 "metrics.jsonl", "summary.json"):
        assert (select / name).is_file(), name
    scores = [json.loads(line) for line in (select / "scores.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(24))
    # "score": the final scoring pass (the default) records each row's harm score
    assert set(scores[0]) == {"index", "id", "weight", "logit", "kept", "score"}
    assert sum(s["kept"] for s in scores) == 18  # 0.75 of 24, from the key=value override
    selected = [json.loads(line) for line in (select / "selected.jsonl").read_text().splitlines()]
    assert {s["id"] for s in selected} == {s["id"] for s in scores if s["kept"]}
    assert selected[0]["messages"][-1]["role"] == "assistant"
    resolved = yaml.safe_load((select / "config.yaml").read_text())
    assert resolved["keep_ratio"] == 0.75 and resolved["model"] == tiny_model
    metrics = [json.loads(line) for line in (select / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and {"f_safe", "g_theta", "gamma"} <= set(metrics[0])
    assert resolved["algorithm"] == "memory-efficient" and "g_theta_prime" not in metrics[0]
    summary = json.loads((select / "summary.json").read_text())
    assert summary["kept"] == 18 and summary["labels"]["unsafe_rows"] == 6
    assert summary["wall_seconds"] > 0 and summary["peak_memory_mb"] > 0
    adapter = out / "finetune" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(adapter))
    assert model.active_adapter == "default"


def test_existing_output_dir_is_an_error(tiny_model, toy_data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = sealft("select", "--model", tiny_model, "--finetune-data", toy_data[0],
                    "--safe-data", toy_data[1], "--output-dir", str(out))
    assert result.returncode == 2
    assert "not empty: it holds files sealft did not write (keep.txt)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_option_names_the_flag(tmp_path):
    result = sealft("select", "--finetune-data", "x.jsonl", "--safe-data", "s.jsonl",
                    "--output-dir", str(tmp_path / "o"), "keep_ratio=1.5")
    assert result.returncode == 2
    assert "--keep-ratio: must be in (0, 1]" in result.stderr
    assert not (tmp_path / "o").exists()
    unknown = sealft("select", "keep_ration=0.5")
    assert unknown.returncode == 2 and "unknown option 'keep_ration'" in unknown.stderr


def test_help_documents_every_option():
    result = sealft("select", "--help")
    assert result.returncode == 0
    for flag in ("--keep-ratio", "--algorithm", "--selector-lr", "--gamma-schedule",
                 "--save-every", "--resume"):
        assert flag in result.stdout
    assert "Share of usable examples to keep" in result.stdout


def test_top_level_help_lists_every_command():
    result = sealft("--help")
    assert result.returncode == 0, result.stderr[-1000:]
    for command in ("select", "finetune", "run", "evaluate", "report", "experiment", "demo"):
        assert command in result.stdout
    assert "p%" in result.stdout  # a literal % in help text used to crash argparse


def test_demo_selects_finetunes_and_reports_removed_rows(tiny_model, toy_data, tmp_path, capsys):
    """`sealft demo`'s pipeline on a tiny model: the default algorithm, both stages' outputs, and
    the printed comparison with random selection."""
    from sealft.demo import DemoArgs, run_demo

    summary = run_demo(DemoArgs(
        model=tiny_model, finetune_data=toy_data[0], safe_data=toy_data[1],
        output_dir=str(tmp_path / "demo"), sample=16, safe_sample=8, batch_size=8,
        safe_batch_size=4, finetune_batch_size=8, max_length=64))
    printed = capsys.readouterr().out
    labels = summary["labels"]
    assert summary["algorithm"] == "memory-efficient" and summary["rows"] == 16
    assert (f"flagged unsafe rows removed: {labels['unsafe_removed']} of "
            f"{labels['unsafe_rows']}") in printed
    assert "random selection removes" in printed
    assert (tmp_path / "demo" / "select" / "scores.jsonl").is_file()
    assert (tmp_path / "demo" / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
