"""Nothing lost: --overwrite next to foreign files and inputs, failed starts, checked resumes,
and resuming past a damaged checkpoint. In-process through the CLI's `main`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_finetune_rows, toy_safe_rows, write_jsonl

from sealft.cli import main

SEAL = ["--epochs", "2", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
        "--gamma-start", "0.5", "--no-show-progress"]


@pytest.fixture()
def data(tmp_path) -> tuple[str, str]:
    return (str(write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(8))),
            str(write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows(4))))


def select(model: str, data: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return ["select", "--model", model, "--finetune-data", data[0], "--safe-data", data[1],
            "--output-dir", str(out), *SEAL, *extra]


def scores(out: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return {r["id"]: r["weight"] for r in rows}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_overwrite_refuses_foreign_files_and_inputs_and_deletes_nothing(
        tiny_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(select(tiny_model, data, out, "--method", "random")) == 0
    (out / "notes.txt").write_text("my notes")
    before = files(out)
    capsys.readouterr()
    assert main(select(tiny_model, data, out, "--method", "random", "--overwrite")) == 2
    assert "notes.txt" in error_line(capsys)
    assert files(out) == before

    (out / "notes.txt").unlink()
    inside = out / "ft.jsonl"
    inside.write_text(Path(data[0]).read_text())
    before = files(out)
    args = select(tiny_model, (str(inside), data[1]), out, "--method", "random", "--overwrite")
    assert main(args) == 2
    # The input is also a foreign file; either way it is named and nothing is deleted.
    assert "ft.jsonl" in error_line(capsys)
    assert files(out) == before


def test_overwrite_replaces_only_what_sealft_wrote(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    assert main(select(tiny_model, data, out, "--method", "random")) == 0
    manifest = json.loads((out / ".sealft-manifest.json").read_text())
    assert manifest["stage"] == "select"
    assert {"config.yaml", "scores.jsonl", "selected.jsonl", "summary.json"} <= set(
        manifest["outputs"])
    assert main(select(tiny_model, data, out, "--method", "random", "--overwrite",
                       "--keep-ratio", "0.5")) == 0
    assert sum(json.loads(line)["kept"] for line in (out / "scores.jsonl").open()) == 4


def test_failed_start_leaves_nothing_and_the_corrected_command_runs(
        tiny_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(select(tiny_model, data, out, "--method", "random",
                       "--chat-template", str(tmp_path / "typo.jinja"))) == 2
    assert "typo.jinja: no such file" in error_line(capsys)
    assert not out.exists()  # a fresh dir is removed again
    # An empty dir the user made stays, and stays empty.
    out.mkdir()
    assert main(select(tiny_model, data, out, "--method", "random", "--limit", "-1")) == 2
    assert list(out.iterdir()) == []
    # Leftovers of a failed start by an older run (config + manifest only) do not block a rerun.
    (out / "config.yaml").write_text("method: random\n")
    (out / ".sealft-manifest.json").write_text(
        json.dumps({"stage": "select", "outputs": ["config.yaml"]}))
    assert main(select(tiny_model, data, out, "--method", "random")) == 0
    assert (out / "scores.jsonl").exists()


def test_resume_refuses_other_settings_and_data_and_lists_the_differences(
        tiny_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(select(tiny_model, data, out, "--save-every", "1")) == 0
    config = (out / "config.yaml").read_text()
    capsys.readouterr()

    assert main(select(tiny_model, data, out, "--resume", "--lr", "0.5", "--seed", "3")) == 2
    line = error_line(capsys)
    assert "lr: 0.001 -> 0.5" in line and "seed: 0 -> 3" in line
    assert (out / "config.yaml").read_text() == config  # not rewritten by a refused resume

    other = write_jsonl(tmp_path / "other.jsonl", toy_finetune_rows(8)[::-1])
    assert main(select(tiny_model, (str(other), data[1]), out, "--resume")) == 2
    assert "finetune_data: 8 rows -> 8 rows (same count, different rows" in error_line(capsys)

    # Settings that cannot change the result may differ.
    assert main(select(tiny_model, data, out, "--resume", "--save-every", "3",
                       "--show-progress", "--num-proc", "2")) == 0


def test_finetune_resume_refuses_other_data(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--model", tiny_model, "--output-dir", str(out), "--epochs", "1",
            "--batch-size", "4", "--no-show-progress"]
    assert main([*args, "--data", data[0]]) == 0
    capsys.readouterr()
    assert main([*args, "--data", data[0], "--limit", "4", "--resume"]) == 2
    line = error_line(capsys)
    assert "limit: None -> 4" in line


@pytest.mark.parametrize("damaged", ["theta.safetensors", "optimizers.pt", "rng.pt",
                                     "state.json"])
def test_resume_past_a_truncated_checkpoint_falls_back_and_matches(
        tiny_model, data, tmp_path, capsys, damaged):
    reference = tmp_path / "reference"
    assert main(select(tiny_model, data, reference, "--save-every", "1")) == 0
    expected = scores(reference)
    assert (reference / "checkpoint").is_dir() and (reference / "checkpoint.prev").is_dir()
    files_in_checkpoint = {p.name for p in (reference / "checkpoint").iterdir()}
    target = reference / "checkpoint" / damaged
    if not target.exists():  # adapter file names follow the algorithm's adapters
        target = next((reference / "checkpoint").glob("*.safetensors"))
    assert target.name in files_in_checkpoint
    target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 3)])
    capsys.readouterr()

    assert main(select(tiny_model, data, reference, "--resume", "--save-every", "1")) == 0
    err = capsys.readouterr().err
    assert f"checkpoint file {target} is unreadable" in err
    assert "resuming from the previous checkpoint" in err
    got = scores(reference)
    assert np.allclose([got[k] for k in expected], [expected[k] for k in expected], atol=1e-6)
    steps = [json.loads(line)["step"] for line in (reference / "metrics.jsonl").open()]
    assert steps == sorted(set(steps))  # the redone step is logged once


def test_corrupt_checkpoint_without_fallback_is_one_line(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(select(tiny_model, data, out)) == 0
    import shutil

    shutil.rmtree(out / "checkpoint.prev", ignore_errors=True)
    (out / "checkpoint" / "rng.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert main(select(tiny_model, data, out, "--resume")) == 2
    line = error_line(capsys)
    assert f"{out / 'checkpoint' / 'rng.pt'} is unreadable" in line
    assert "no earlier complete checkpoint" in line


def test_version_debug_anywhere_and_umask(tiny_model, data, tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("sealft ")
    bad = ["select", "--model", tiny_model, "--finetune-data", str(tmp_path / "nope.jsonl"),
           "--safe-data", data[1], "--output-dir", str(tmp_path / "x")]
    assert main(["--debug", *bad]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main([*bad, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err

    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        assert main(select(tiny_model, data, out, "--method", "random")) == 0
    finally:
        os.umask(old)
    for name in ("scores.jsonl", "selected.jsonl", "config.yaml", "summary.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_end_of_run_summary(tiny_model, tmp_path, capsys):
    rows = toy_finetune_rows(8) + [{"instruction": "q", "output": " ", "flag": "finetune"}]
    ft = write_jsonl(tmp_path / "ft.jsonl", rows)
    out = tmp_path / "ft-run"
    assert main(["finetune", "--model", tiny_model, "--data", str(ft), "--output-dir", str(out),
                 "--epochs", "1", "--batch-size", "4", "--no-show-progress"]) == 0
    err = capsys.readouterr().err
    assert "sealft finetune: 9 rows read, 8 used, 1 skipped" in err
    assert "1 × empty response" in err
    assert str(out / "adapter") in err and "peak memory" in err and "wall time" in err


def test_old_option_names_still_work_with_a_note(tmp_path, capsys, monkeypatch):
    from sealft import config as cfg
    from sealft.report import ReportArgs

    monkeypatch.setattr(cfg, "_WARNED", set())  # the note is once per process

    args = cfg.build(ReportArgs, {"runs": "a", "output": str(tmp_path / "r"),
                                  "flag_field": "flag"})
    assert args.output_dir == str(tmp_path / "r") and args.label_field == "flag"
    err = capsys.readouterr().err
    assert "option output is deprecated; use output_dir" in err


def test_old_flags_still_parse(capsys, monkeypatch):
    from sealft import config as cfg
    from sealft.cli import build_parser
    from sealft.select import SelectArgs

    monkeypatch.setattr(cfg, "_WARNED", set())  # the note is once per process

    namespace = build_parser("select").parse_args(
        ["select", "--finetune-data", "f.jsonl", "--safe-data", "s.jsonl", "--output-dir", "o",
         "--safe-limit", "3"])
    assert cfg.from_namespace(SelectArgs, namespace).safe_sample == 3
    assert "use safe_sample" in capsys.readouterr().err
