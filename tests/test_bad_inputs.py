"""Every bad input a clear error: one line on stderr naming the culprit, exit code 2, no
traceback, and nothing that existed before changed (inputs and earlier runs' outputs).

The cases run in-process through the CLI's `main` (a subprocess per case would cost a Python
+ torch start each); placeholders in the arguments are filled per test:
{w} workspace, {ft}/{safe} good data, {model} the tiny model, {out} a fresh output dir,
{done} a finished selection run shared by the module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import toy_finetune_rows, toy_safe_rows, write_jsonl

from sealft.cli import main

FAST = ["--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2", "--no-show-progress"]
ALPACA = '{"instruction": "q", "output": "a"}\n'
MESSAGES = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


def select(*extra: str) -> list[str]:
    return ["select", "--model", "{model}", "--finetune-data", "{ft}", "--safe-data", "{safe}",
            "--output-dir", "{out}", *FAST, *extra]


def finetune(*extra: str) -> list[str]:
    return ["finetune", "--model", "{model}", "--data", "{ft}", "--output-dir", "{out}", *FAST,
            *extra]


def evaluate(*extra: str) -> list[str]:
    return ["evaluate", "--model", "{model}", "--output-dir", "{out}", "--no-show-progress",
            *extra]


# (name, files to create in the workspace {name: text or bytes}, argv, fragment of the message)
CASES = [
    # --- data files -------------------------------------------------------------------------
    ("missing data file", {}, select("--finetune-data", "{w}/nope.jsonl"), "does not exist"),
    ("malformed json line", {"ft.jsonl": ALPACA + "{oops\n"},
     select("--finetune-data", "{w}/ft.jsonl"), "ft.jsonl:2: malformed JSON"),
    ("jsonl line not an object", {"ft.jsonl": ALPACA + "[1, 2]\n"},
     select("--finetune-data", "{w}/ft.jsonl"), "ft.jsonl:2: expected a JSON object"),
    ("unknown format", {"ft.jsonl": '{"foo": 1}\n'}, select("--finetune-data", "{w}/ft.jsonl"),
     "fields seen: ['foo']"),
    ("missing response field", {"ft.jsonl": ALPACA + '{"instruction": "q"}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 2: missing field 'output'"),
    ("null field is null, not missing", {"ft.jsonl": '{"instruction": "q", "output": null}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: field 'output' is null"),
    ("non-string field", {"ft.jsonl": '{"instruction": "q", "output": 5}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: field 'output' must be a string"),
    ("empty dataset", {"ft.jsonl": ""}, select("--finetune-data", "{w}/ft.jsonl"), "is empty"),
    ("duplicate ids", {"ft.jsonl": '{"id": 1, "prompt": "a", "completion": "b"}\n'
                                   '{"id": 1, "prompt": "c", "completion": "d"}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "rows 1 and 2 have the same id '1'"),
    ("mixed formats in one file", {"ft.jsonl": ALPACA + MESSAGES},
     select("--finetune-data", "{w}/ft.jsonl"), "row 2: missing field 'instruction'"),
    ("--format messages on alpaca rows", {"ft.jsonl": ALPACA},
     select("--finetune-data", "{w}/ft.jsonl", "--format", "messages"),
     "row 1: missing field 'messages' (format messages); the row looks like alpaca"),
    ("unknown --format", {}, select("--format", "chatml"), "--format 'chatml'"),
    ("messages not a list", {"ft.jsonl": '{"messages": "hello"}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: 'messages' must be a non-empty list"),
    ("message without role", {"ft.jsonl": '{"messages": [{"content": "q"}]}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: messages[0] needs 'role'"),
    ("sharegpt turn not an object", {"ft.jsonl": '{"conversations": ["hi"]}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: not a valid sharegpt row"),
    ("prompt/completion of the wrong type", {"ft.jsonl": '{"prompt": 1, "completion": 2}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "row 1: 'prompt'/'completion' must be"),
    ("truncated .gz", {"ft.jsonl.gz": gzip.compress((ALPACA * 200).encode())[:60]},
     select("--finetune-data", "{w}/ft.jsonl.gz"), "truncated or corrupt"),
    (".gz that is not gzip", {"ft.jsonl.gz": ALPACA}, select("--finetune-data", "{w}/ft.jsonl.gz"),
     "not a gzip file"),
    ("not UTF-8", {"ft.jsonl": b'{"instruction": "caf\xe9", "output": "a"}\n'},
     select("--finetune-data", "{w}/ft.jsonl"), "not UTF-8 text"),
    ("csv with more cells than columns", {"ft.csv": "instruction,output\nq,a,extra\n"},
     select("--finetune-data", "{w}/ft.csv"), "ft.csv row 1: more cells than header"),
    ("csv without the needed columns", {"ft.csv": "question\nq\n"},
     select("--finetune-data", "{w}/ft.csv"), "fields seen: ['question']"),
    ("json list of non-objects", {"ft.json": "[1, 2]"}, select("--finetune-data", "{w}/ft.json"),
     "expected a JSON list of objects"),
    ("malformed json file", {"ft.json": '[{"a": 1},'}, select("--finetune-data", "{w}/ft.json"),
     "malformed JSON"),
    ("corrupt parquet", {"ft.parquet": b"PAR1 this is not parquet"},
     select("--finetune-data", "{w}/ft.parquet"), "cannot read it as PARQUET"),
    ("unknown file type", {"ft.txt": "hello"}, select("--finetune-data", "{w}/ft.txt"),
     "unknown file type"),
    ("folder that is not a dataset", {"folder/readme.md": "x"},
     select("--finetune-data", "{w}/folder"), "not a readable dataset"),
    ("all rows too long", {"ft.jsonl": json.dumps({"prompt": "the movie " * 200,
                                                   "completion": "b"}) + "\n"},
     select("--finetune-data", "{w}/ft.jsonl", "--max-length", "16"),
     "none of the 1 examples can be used"),
    ("bad safe data row", {"safe.jsonl": ALPACA + '{"instruction": "q"}\n'},
     select("--safe-data", "{w}/safe.jsonl"), "safe.jsonl row 2: missing field 'output'"),
    # --- options ----------------------------------------------------------------------------
    ("keep ratio zero", {}, select("keep_ratio=0"), "--keep-ratio: must be in (0, 1]"),
    ("keep ratio above one", {}, select("--keep-ratio", "1.2"), "--keep-ratio: must be in"),
    ("neighbour weight above one", {}, select("--neighbour-weight", "1.5"),
     "--neighbour-weight: must be in [0, 1]"),
    ("neighbour weight with visits scoring", {},
     select("--neighbour-weight", "0.5", "--scoring", "visits"),
     "--neighbour-weight: adds to the final pass"),
    ("keep count larger than the data", {}, select("--keep-count", "1000"), "--keep-count 1000"),
    ("unknown method", {}, select("--method", "magic"), "--method: use one of"),
    ("unknown algorithm", {}, select("--algorithm", "alg3"), "--algorithm: use"),
    ("not a number", {}, select("--epochs", "two"), "--epochs: cannot read 'two' as int"),
    ("not a boolean", {}, select("drop_duplicates=maybe"), "--drop-duplicates: cannot read"),
    ("missing safe data", {}, select("--safe-data", ""), "--safe-data: required"),
    ("negative limit", {}, select("--limit", "-5"), "--limit: must be a positive number"),
    ("zero sample", {}, select("--sample", "0"), "--sample: must be a positive number"),
    ("negative safe sample", {}, select("--safe-sample", "-1"), "--safe-sample: must be"),
    ("negative selector lr names its flag", {}, select("--selector-lr", "-1"),
     "--selector-lr: must be a positive number"),
    ("zero lr", {}, select("--lr", "0"), "--lr: must be a positive number"),
    ("infinite lr", {}, select("--lr", "inf"), "--lr: must be a positive number"),
    ("zero lora rank", {}, select("--lora-r", "0"), "--lora-r: must be positive"),
    ("lora dropout of one", {}, select("--lora-dropout", "1"), "--lora-dropout: must be in"),
    ("zero micro batch", {}, select("--micro-batch-size", "0"), "--micro-batch-size: must be"),
    ("bad dtype", {}, select("--dtype", "float8"), "--dtype: use float32"),
    ("resume with overwrite", {}, select("--resume", "--overwrite"), "exclude each other"),
    ("unknown option", {}, select("epoch=3"), "unknown option 'epoch'"),
    ("unknown flag", {}, select("--selectr-lr", "1"), "unrecognized arguments: --selectr-lr"),
    ("override with empty key", {}, select("=3"), "expected key=value"),
    ("missing --config", {}, select("--config", "{w}/nope.yaml"), "--config"),
    ("invalid yaml", {"c.yaml": "a: [1, 2\n"}, select("--config", "{w}/c.yaml"), "invalid YAML"),
    ("yaml that is a list", {"c.yaml": "- a\n- b\n"}, select("--config", "{w}/c.yaml"),
     "expected a mapping"),
    ("--config is a folder", {"cfgdir/x": ""}, select("--config", "{w}/cfgdir"),
     "--config"),
    # --- models and chat templates ------------------------------------------------------------
    ("unknown model name", {}, select("--model", "no-such-model"),
     "neither a local folder nor a hub id"),
    ("missing local model path", {}, select("--model", "{w}/models/nope"),
     "no such folder or file"),
    ("relative model path that does not exist", {}, select("--model", "./nope-model"),
     "no such folder or file"),
    ("empty model folder", {"empty-model/.keep": ""}, select("--model", "{w}/empty-model"),
     "has no config.json"),
    ("model folder without tokenizer", {"@no-tokenizer": ""},
     select("--model", "{w}/no-tokenizer"), "cannot load its tokenizer"),
    ("truncated model weights", {"@truncated-weights": ""},
     select("--model", "{w}/truncated-weights"), "cannot load the weights"),
    ("model path is a file", {"weights.bin": "x"}, select("--model", "{w}/weights.bin"),
     "a file; pass the folder"),
    ("missing .gguf file", {}, select("--model", "{w}/model.gguf"), "file does not exist"),
    ("mistyped --chat-template path", {}, select("--chat-template", "{w}/tmpl.jinja"),
     "--chat-template {w}/tmpl.jinja: no such file"),
    ("invalid jinja template", {"t.jinja": "{% for m in messages %}{{ m['content'] }"},
     select("--chat-template", "{w}/t.jinja"), "--chat-template: the chat template does not"),
    ("template file without jinja", {"t.jinja": "just words"},
     select("--chat-template", "{w}/t.jinja"), "has no Jinja tags"),
    ("template that drops the messages", {"t.jinja": "{% if false %}{% endif %}fixed text"},
     select("--chat-template", "{w}/t.jinja"), "leaves out the messages"),
    ("lora target that does not exist", {}, select("--lora-target-modules", "nope_proj"),
     "--lora-target-modules"),
    # --- output dirs --------------------------------------------------------------------------
    ("output dir is a file", {"taken.txt": "x"}, select("--output-dir", "{w}/taken.txt"),
     "exists and is not a directory"),
    ("output dir under a file", {"taken.txt": "x"}, select("--output-dir", "{w}/taken.txt/run"),
     "cannot create it"),
    ("output dir holding a foreign file", {"busy/notes.txt": "mine"},
     select("--output-dir", "{w}/busy"), "files sealft did not write (notes.txt)"),
    ("--overwrite next to a foreign file", {"busy/notes.txt": "mine"},
     select("--output-dir", "{w}/busy", "--overwrite"), "nothing was deleted"),
    ("--overwrite of another stage's run", {}, finetune("--output-dir", "{done}", "--overwrite"),
     "holds a `sealft select` run"),
    ("--resume of another stage's run", {}, finetune("--output-dir", "{done}", "--resume"),
     "holds a `sealft select` run"),
    ("finished run without --resume", {}, select("--output-dir", "{done}"),
     "pass --resume to continue it"),
    ("resume with a different learning rate", {}, select("--output-dir", "{done}", "--resume",
                                                         "--method", "random", "--lr", "0.5"),
     "lr: 1e-05 -> 0.5"),
    # --- finetune / run / evaluate / report / experiment / demo ------------------------------
    ("finetune without data", {}, finetune("--data", ""), "--data: required"),
    ("finetune negative limit", {}, finetune("--limit", "-1"), "--limit: must be"),
    ("finetune zero epochs", {}, finetune("--epochs", "0"), "--epochs: must be positive"),
    ("finetune weights file missing", {}, finetune("--weights-from", "{w}/scores.jsonl"),
     "scores.jsonl: file not found"),
    ("finetune weights file of the wrong kind", {"scores.jsonl": '{"weight": "high"}\n'},
     finetune("--weights-from", "{w}/scores.jsonl"), "row 1: expected {{id, weight}}"),
    ("finetune data inside the dir it would overwrite", {},
     finetune("--data", "{done}/selected.jsonl", "--output-dir", "{done}", "--overwrite"),
     "selected.jsonl is an input of this run"),
    ("run without output dir", {}, ["run", "select.model={model}"], "--output-dir: required"),
    ("run with a bad stage option", {}, ["run", "--output-dir", "{out}", "select.keep_ratio=2",
                                         "select.finetune_data={ft}", "select.safe_data={safe}"],
     "--keep-ratio: must be in (0, 1]"),
    ("run with an unknown stage option", {}, ["run", "--output-dir", "{out}", "select.bogus=1"],
     "unknown option 'bogus'"),
    ("run --overwrite with its data inside", {"@data-inside": ""},
     ["run", "--output-dir", "{w}/inside", "--overwrite", "select.model={model}",
      "select.finetune_data={w}/inside/ft.jsonl", "select.safe_data={safe}"],
     "is an input of this run"),
    ("finetune on mixed formats", {"ft.jsonl": ALPACA + MESSAGES},
     finetune("--data", "{w}/ft.jsonl"), "row 2: missing field 'instruction'"),
    ("finetune negative sample", {}, finetune("--sample", "-3"), "--sample: must be a positive"),
    ("finetune with a mistyped template", {}, finetune("--chat-template", "tmpl.jinja"),
     "--chat-template tmpl.jinja: no such file"),
    ("run with a missing model", {}, ["run", "--output-dir", "{out}", "select.model={w}/nope",
                                      "select.finetune_data={ft}", "select.safe_data={safe}"],
     "--model {w}/nope: no such folder or file"),
    ("evaluate a broken adapter", {"bad/adapter_config.json": '{"peft_type": "LORA"}',
                                   "p.txt": "hi\n"},
     evaluate("--adapter", "{w}/bad", "--suite", "custom", "--prompt-files", "{w}/p.txt"),
     "--adapter {w}/bad: cannot load it"),
    ("evaluate with a mistyped template", {"p.txt": "hi\n"},
     evaluate("--suite", "custom", "--prompt-files", "{w}/p.txt", "--chat-template", "t.jinja"),
     "--chat-template t.jinja: no such file"),
    ("run with a missing fine-tuning file", {},
     ["run", "--output-dir", "{out}", "select.model={model}", "select.finetune_data={ft}",
      "select.safe_data={safe}", "finetune.data={w}/typo.jsonl"],
     "finetune.data {w}/typo.jsonl: does not exist"),
    ("finetune on a selection run folder", {}, finetune("--data", "{done}"),
     "a selection run folder, not a data file; pass"),
    ("empty json file", {"ft.json": ""}, select("--finetune-data", "{w}/ft.json"),
     "ft.json"),
    ("evaluate with an unknown judge", {}, evaluate("--judge", "magic"), "--judge: use one of"),
    ("evaluate negative sample", {}, evaluate("--sample", "-1"), "--sample: must be a positive"),
    ("evaluate into a selection run", {}, evaluate("--output-dir", "{done}"),
     "holds a `sealft select` run"),
    ("evaluate --overwrite of a selection run", {}, evaluate("--output-dir", "{done}",
                                                             "--overwrite"),
     "holds a `sealft select` run"),
    ("report into a file", {"r.md": "x"}, ["report", "{done}", "--output-dir", "{w}/r.md"],
     "--output-dir: {w}/r.md is a file"),
    ("report without runs", {}, ["report", "--output-dir", "{out}"], "--runs: give at least"),
    ("experiment with invalid yaml", {"e.yaml": "grid: [\n"},
     ["experiment", "--config", "{w}/e.yaml"], "invalid YAML"),
    ("demo with an unknown option", {}, ["demo", "epochz=1"], "unknown option 'epochz'"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make_special(name: str, workspace: Path, model: str, ft: str) -> None:
    """Fixtures too big to write inline: broken copies of the tiny model, data in a run dir."""
    if name == "no-tokenizer":
        target = workspace / name
        target.mkdir()
        for file in ("config.json", "model.safetensors"):
            shutil.copy(Path(model) / file, target / file)
    elif name == "truncated-weights":
        target = workspace / name
        shutil.copytree(model, target)
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif name == "data-inside":
        inside = workspace / "inside"
        inside.mkdir()
        shutil.copy(ft, inside / "ft.jsonl")


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    """A completed (cheap) selection run: the 'earlier outputs' that must survive."""
    root = tmp_path_factory.mktemp("done")
    ft = write_jsonl(root / "ft.jsonl", toy_finetune_rows(8))
    safe = write_jsonl(root / "safe.jsonl", toy_safe_rows(4))
    out = root / "run"
    assert main(["select", "--model", tiny_model, "--finetune-data", str(ft), "--safe-data",
                 str(safe), "--output-dir", str(out), "--method", "random", *FAST]) == 0
    return out


@pytest.mark.parametrize("name,files,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, files, argv, message, tiny_model,
                                                    finished_run, tmp_path, capsys,
                                                    monkeypatch):
    workspace = tmp_path / "w"
    workspace.mkdir()
    ft = write_jsonl(workspace / "good-ft.jsonl", toy_finetune_rows(8))
    safe = write_jsonl(workspace / "good-safe.jsonl", toy_safe_rows(4))
    for file_name, content in files.items():
        if file_name.startswith("@"):
            _make_special(file_name[1:], workspace, tiny_model, str(ft))
            continue
        path = workspace / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    monkeypatch.chdir(workspace)
    values = {"w": str(workspace), "ft": str(ft), "safe": str(safe), "model": tiny_model,
              "out": str(tmp_path / "out"), "done": str(finished_run)}
    before, done_before = _snapshot(tmp_path), _snapshot(finished_run)
    capsys.readouterr()

    code = main([arg.format(**values) for arg in argv])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert message.format(**values) in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "inputs or earlier outputs changed"
    assert _snapshot(finished_run) == done_before, "the earlier run's outputs changed"
    assert not (tmp_path / "out").exists(), "a failed start left an output dir behind"


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_a_byte_order_mark_is_not_data(tmp_path):
    from sealft.data import load_examples

    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes("\ufeffinstruction,output\nq,a\n".encode())
    jsonl_file = tmp_path / "notepad.jsonl"
    jsonl_file.write_bytes(("\ufeff" + ALPACA).encode())
    for path in (csv_file, jsonl_file):
        assert load_examples(str(path))[0]["messages"][-1]["content"] == "a"


def test_many_empty_generations_are_warned_about(capsys):
    from types import SimpleNamespace

    from sealft.evaluate.run import warn_empty_generations

    items = [{"id": str(i)} for i in range(10)]
    suites = {"safety": [SimpleNamespace(items=items)]}
    cache = {("safety", str(i)): {"response": "" if i < 5 else "no"} for i in range(10)}
    assert warn_empty_generations(cache, suites) == 5
    assert "5 of 10 generations are empty" in capsys.readouterr().err
    cache = {key: {"response": "" if key[1] == "0" else "no"} for key in cache}
    assert warn_empty_generations(cache, suites) == 1
    assert capsys.readouterr().err == ""  # one empty answer can be a real (odd) answer
