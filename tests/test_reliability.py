"""Kill-and-resume, several processes, and bad input: the run survives and errors are clear."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_finetune_rows, write_jsonl

SELECT = ["--epochs", "2", "--batch-size", "4", "--micro-batch-size", "2", "--gamma-start",
          "0.5", "--lr", "1e-3", "--no-show-progress"]


def _scores(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    return {r["id"]: r["weight"] for r in rows}


def _select_cmd(model: str, data: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sealft", "select", "--model", model, "--finetune-data",
            data[0], "--safe-data", data[1], "--output-dir", str(out), *SELECT, *extra]


def _kill_after_a_checkpoint(cmd: list[str], out: Path) -> None:
    """Start `cmd`, SIGKILL it mid-epoch once a checkpoint and 3 logged steps exist."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "checkpoint").exists() and metrics.exists() and len(
                metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_run_resumes_to_the_same_scores(tiny_model, toy_data, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_select_cmd(tiny_model, toy_data, reference), check=True,
                   capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    _kill_after_a_checkpoint(_select_cmd(tiny_model, toy_data, killed, "--save-every", "2"),
                             killed)
    assert not (killed / "scores.jsonl").exists(), "the run finished before it was killed"
    resumed = subprocess.run(_select_cmd(tiny_model, toy_data, killed, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _scores(reference), _scores(killed)
    assert got.keys() == expected.keys()
    assert np.allclose([got[k] for k in expected], [expected[k] for k in expected], atol=1e-6)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), steps  # no step lost or logged twice


def test_killed_finetune_resumes_to_the_same_adapter(tiny_model, toy_data, tmp_path):
    from safetensors.torch import load_file

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "sealft", "finetune", "--model", tiny_model, "--data",
                toy_data[0], "--epochs", "3", "--batch-size", "2", "--micro-batch-size", "1",
                "--lr", "1e-3", "--no-show-progress", "--output-dir", str(out), *extra]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cmd(reference), check=True, capture_output=True, timeout=600)
    _kill_after_a_checkpoint(cmd(killed, "--save-every", "2"), killed)
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    resumed = subprocess.run(cmd(killed, "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 37)), steps


def test_two_processes_match_one(tiny_model, toy_data, tmp_path):
    one = tmp_path / "one"
    subprocess.run(_select_cmd(tiny_model, toy_data, one), check=True, capture_output=True,
                   timeout=600)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000), "-m", "sealft", "select",
         *_select_cmd(tiny_model, toy_data, two)[4:]],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _scores(one), _scores(two)
    keys = sorted(a)
    from scipy.stats import spearmanr

    rho = spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic
    assert rho >= 0.999, rho
    assert json.loads((two / "summary.json").read_text())["processes"] == 2


def test_two_process_finetune_matches_one(tiny_model, toy_data, tmp_path):
    """DDP through accelerator.prepare: the same adapter as one process with the same global
    batch, including a last batch of one row (the second rank then holds no row)."""
    from safetensors.torch import load_file

    args = ["finetune", "--model", tiny_model, "--data", toy_data[0], "--limit", "21",
            "--epochs", "1", "--batch-size", "5", "--micro-batch-size", "2", "--lr", "1e-3",
            "--no-show-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sealft", *args, "--output-dir", str(one)],
                   check=True, capture_output=True, timeout=600, env=env)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29600 + os.getpid() % 1000), "-m", "sealft", *args,
         "--output-dir", str(two)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    trained = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in trained)  # the step really moved the adapter


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback happens without GPUs")
@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_without_gpus_is_refused(tiny_model, toy_data, tmp_path, variable):
    """On CPU, Accelerate turns an FSDP / DeepSpeed launch into plain data parallel; sealft says
    so instead of training unsharded while the user believes otherwise."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sealft", "finetune", "--model", tiny_model, "--data",
         toy_data[0], "--output-dir", str(out), "--no-show-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, variable: "true"})
    assert result.returncode == 2, result.stderr[-2000:]
    engine = variable.rsplit("_", 1)[-1]
    assert f"the launch asked for {engine}" in result.stderr.strip().splitlines()[-1]
    assert "configs/accelerate/ddp.yaml" in result.stderr
    assert not out.exists()


BAD_INPUTS = [
    # (name, files {name: content}, extra args, expected message fragment)
    ("missing file", {}, ["--finetune-data", "nope.jsonl"], "does not exist"),
    ("malformed line", {"ft.jsonl": '{"prompt": "a", "completion": "b"}\n{oops\n'},
     ["--finetune-data", "ft.jsonl"], "ft.jsonl:2: malformed JSON"),
    ("unknown format", {"ft.jsonl": '{"foo": 1}\n'}, ["--finetune-data", "ft.jsonl"],
     "fields seen: ['foo']"),
    ("missing response", {"ft.jsonl": '{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n'},
     ["--finetune-data", "ft.jsonl"], "row 2: missing field 'output'"),
    ("empty dataset", {"ft.jsonl": ""}, ["--finetune-data", "ft.jsonl"], "empty"),
    ("duplicate ids", {"ft.jsonl": '{"id": 1, "prompt": "a", "completion": "b"}\n'
                                   '{"id": 1, "prompt": "c", "completion": "d"}\n'},
     ["--finetune-data", "ft.jsonl"], "rows 1 and 2 have the same id '1'"),
    ("all too long", {"ft.jsonl": '{"prompt": "' + "the movie " * 200 + '", "completion": "b"}\n'},
     ["--finetune-data", "ft.jsonl", "--max-length", "16"], "none of the 1 examples can be used"),
    ("ratio zero", {}, ["keep_ratio=0"], "--keep-ratio: must be in (0, 1]"),
    ("ratio above one", {}, ["--keep-ratio", "1.2"], "--keep-ratio: must be in (0, 1]"),
    ("keep count too large", {}, ["--keep-count", "1000"], "--keep-count 1000 is larger"),
    ("unknown method", {}, ["--method", "magic"], "--method: use one of"),
    ("unknown algorithm", {}, ["--algorithm", "alg3"], "--algorithm: use"),
    ("bad number", {}, ["--epochs", "two"], "--epochs: cannot read 'two' as int"),
    ("missing safe data", {}, ["--safe-data", ""], "--safe-data: required"),
    ("bad yaml", {"c.yaml": "a: [1, 2\n"}, ["--config", "c.yaml"], "invalid YAML"),
    ("unknown option", {}, ["epoch=3"], "unknown option 'epoch'"),
    ("unknown model id", {}, ["--model", "no-such-model"], "neither a local folder nor a hub id"),
    ("resume with overwrite", {}, ["--resume", "--overwrite"], "exclude each other"),
    ("unknown file type", {"ft.txt": "hello"}, ["--finetune-data", "ft.txt"],
     "unknown file type"),
    ("bad dtype", {}, ["--dtype", "float8"], "--dtype: use float32"),
]


@pytest.mark.parametrize("name,files,extra,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_cleanly(tiny_model, toy_data, tmp_path, name, files, extra, message):
    for file_name, content in files.items():
        (tmp_path / file_name).write_text(content)
    out = tmp_path / "out"
    args = ["--model", tiny_model, "--finetune-data", toy_data[0], "--safe-data", toy_data[1],
            "--output-dir", str(out), *SELECT]
    result = subprocess.run([sys.executable, "-m", "sealft", "select", *args, *extra],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert message in last, last
    assert "Traceback" not in result.stderr
    assert not (out / "scores.jsonl").exists() and not (out / "selected.jsonl").exists()


def test_model_without_chat_template_says_how_to_fix(tiny_model, tmp_path):
    import shutil

    from sealft.errors import ModelError
    from sealft.models import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in bare.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ModelError, match="no chat template; pass --chat-template"):
        load_tokenizer(str(bare))
    assert load_tokenizer(str(bare), chat_template="{{ messages }}").chat_template


def test_adapter_dir_that_is_not_an_adapter(tmp_path):
    from sealft.errors import ModelError
    from sealft.models import load_adapter

    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_adapter(None, str(tmp_path))


def test_scores_from_another_dataset_are_rejected(tmp_path):
    from sealft.errors import DataError
    from sealft.selector import align_scores

    with pytest.raises(DataError, match="learned on a different dataset"):
        align_scores(["a", "b"], np.array([1.0, 2.0]), ["a", "c"], "scores.jsonl")


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    from sealft.io import atomic_write

    target = tmp_path / "scores.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half a line")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.jsonl"]


def test_nan_loss_stops_with_step_and_ids(tiny_model, tmp_path):
    rows = toy_finetune_rows(8)
    data = write_jsonl(tmp_path / "ft.jsonl", rows)
    safe = write_jsonl(tmp_path / "safe.jsonl", rows[:2])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sealft", "select", "--model", tiny_model, "--finetune-data",
         str(data), "--safe-data", str(safe), "--output-dir", str(out), *SELECT,
         "--lr", "1e30", "--algorithm", "memory-efficient", "--save-every", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "non-finite loss at step" in result.stderr and "examples" in result.stderr
    assert (out / "checkpoint" / "state.json").exists()
