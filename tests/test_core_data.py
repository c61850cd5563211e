"""Data formats, ids and input errors."""

from __future__ import annotations

import json

import pytest

from sealft.data import Examples, detect_format, example_id, load_examples, normalise, sample_rows
from sealft.errors import DataError


def test_formats_normalise_to_chat_messages():
    cases = {
        "messages": {"messages": [{"role": "system", "content": "S"},
                                  {"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "A"}]},
        "prompt_completion": {"prompt": "Q", "completion": "A"},
        "alpaca": {"instruction": "Q", "input": "ctx", "output": "A"},
        "orca": {"system_prompt": "S", "question": "Q", "response": "A"},
        "hh": {"chosen": "\n\nHuman: Q\n\nAssistant: A"},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"},
                                       {"from": "gpt", "value": "A"}]},
    }
    for fmt, row in cases.items():
        assert detect_format(row, "x") == fmt
        messages = normalise([row])[0]["messages"]
        assert messages[-1] == {"role": "assistant", "content": "A"}, fmt
    assert normalise([cases["messages"]])[0]["messages"][0]["role"] == "system"
    assert normalise([cases["alpaca"]])[0]["messages"][0]["content"] == "Q\n\nctx"
    assert normalise([cases["orca"]])[0]["messages"][0] == {"role": "system", "content": "S"}


def test_ids_are_stable_and_content_based():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    first = [e["id"] for e in normalise(rows)]
    second = [e["id"] for e in normalise(list(reversed(rows)))]
    assert first == list(reversed(second))
    assert normalise([{"id": 7, "prompt": "a", "completion": "b"}])[0]["id"] == "7"
    assert first[0] == example_id([{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "b"}])


def test_duplicate_ids_name_both_rows():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "x", "completion": "y"},
            {"prompt": "a", "completion": "b"}]
    with pytest.raises(DataError, match="rows 1 and 3"):
        normalise(rows, "f.jsonl")
    assert len(normalise(rows, drop_duplicates=True)) == 2
    with pytest.raises(DataError, match="rows 1 and 2 have the same id '1'"):
        normalise([{"id": 1, "prompt": "a", "completion": "b"},
                   {"id": 1, "prompt": "c", "completion": "d"}])


def test_meta_fields_are_kept():
    example = normalise([{"instruction": "q", "output": "a", "flag": "unsafe"}])[0]
    assert example["meta"] == {"flag": "unsafe"}


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_examples(str(path))


def test_unknown_format_lists_fields(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"foo": 1, "bar": 2}]))
    with pytest.raises(DataError, match=r"unknown data format; fields seen: \['bar', 'foo'\]"):
        load_examples(str(path))


def test_missing_response_field_names_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    with pytest.raises(DataError, match="row 2: missing field 'output'"):
        load_examples(str(path), fmt="alpaca")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_examples(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_parquet_csv_and_json_list(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ids = [[e["id"] for e in load_examples(str(tmp_path / f"d.{ext}"))]
           for ext in ("parquet", "csv", "json")]
    assert ids[0] == ids[1] == ids[2]


def test_real_shared_files_load(shared_data):
    examples = load_examples(str(shared_data / "finetune" / "sst2_n1000_p0.1.json"))
    assert len(examples) == 1000
    assert sum(e["meta"]["flag"] == "unsafe" for e in examples) == 100
    safe = load_examples(str(shared_data / "safe" / "hh_rlhf_harmless_base_test.jsonl.gz"))
    assert safe[0]["messages"][0]["role"] == "user"


def _mixed_rows(n: int) -> list[dict]:
    return [{"instruction": f"question {i}", "output": f"answer {i}", "flag": "unsafe" if i % 3
             else "safe", "score": i / 2} for i in range(n)]


def test_loaded_examples_live_in_arrow_and_read_back_as_normalised(tmp_path):
    rows = _mixed_rows(25)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_examples(str(tmp_path / "d.jsonl"))
    expected = normalise(rows)
    assert isinstance(loaded, Examples) and not isinstance(loaded, list)
    assert len(loaded) == 25 and list(loaded) == expected
    assert loaded[3] == expected[3] and loaded[-1] == expected[-1]
    assert loaded.column("id") == [e["id"] for e in expected]
    # Views index the same file; row numbers stay the input's.
    view = loaded.take([4, 1, 20])
    assert [e["index"] for e in view] == [4, 1, 20] and view[2] == expected[20]
    assert [e["index"] for e in loaded[5:8]] == [5, 6, 7]
    assert [e["index"] for e in view.take([2, 0])] == [20, 4]
    assert [e["index"] for e in sample_rows(loaded, 6, seed=1)] == [
        e["index"] for e in sample_rows(expected, 6, seed=1)]
    with pytest.raises(IndexError):
        loaded[25]


def test_loaded_examples_keep_load_errors_and_limit(tmp_path):
    rows = _mixed_rows(10)
    rows[7] = {"instruction": "no output"}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples(str(tmp_path / "d.jsonl"), limit=5)) == 5
    with pytest.raises(DataError, match="row 8: missing field 'output'"):  # 1-based, line 8
        load_examples(str(tmp_path / "d.jsonl"))


def test_streamed_loading_keeps_the_bad_input_errors(tmp_path):
    """iter_rows / load_examples stream rows, yet every failure is still one DataError or
    ConfigError naming the file (BOM ignored, unreadable files, 1-based rows, --limit)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sealft.errors import ConfigError

    rows = _mixed_rows(4)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [e["id"] for e in load_examples(str(tmp_path / "bom.jsonl"))] == [
        e["id"] for e in normalise(rows)]
    (tmp_path / "latin1.jsonl").write_bytes(text.replace("answer 2", "caf\xe9").encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: not UTF-8 text"):
        load_examples(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(DataError, match="cut.jsonl.gz: the compressed file is truncated"):
        load_examples(str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "plain.jsonl.gz").write_text(text)
    with pytest.raises(DataError, match="plain.jsonl.gz: not a gzip file"):
        load_examples(str(tmp_path / "plain.jsonl.gz"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "bad.parquet").write_bytes((tmp_path / "d.parquet").read_bytes()[:40])
    with pytest.raises(DataError, match="bad.parquet: cannot read it as PARQUET"):
        load_examples(str(tmp_path / "bad.parquet"))
    bad = rows[:2] + [{"instruction": "q"}] + rows[3:]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "gap.parquet")
    with pytest.raises(DataError, match="gap.parquet row 3: field 'output' is null"):
        load_examples(str(tmp_path / "gap.parquet"))
    with pytest.raises(DataError, match="missing.jsonl: does not exist|missing.jsonl does not"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="--limit: must be a positive number of rows, got 0"):
        load_examples(str(tmp_path / "bom.jsonl"), limit=0)
    with pytest.raises(ConfigError, match="--format 'yaml'"):
        load_examples(str(tmp_path / "bom.jsonl"), fmt="yaml")


def test_saved_dataset_folders_stream_with_checked_splits(tmp_path):
    import datasets

    rows = _mixed_rows(6)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    assert [e["index"] for e in load_examples(str(tmp_path / "flat"))] == list(range(6))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(load_examples(str(tmp_path / "dict"), split="test")) == 3
    with pytest.raises(DataError, match="no split 'dev'; --split one of train, test"):
        load_examples(str(tmp_path / "dict"), split="dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: a folder, but not a readable dataset"):
        load_examples(str(tmp_path / "empty"))


def test_data_fingerprint_of_arrow_examples_equals_that_of_the_dicts(tmp_path):
    from sealft.config import data_fingerprint

    rows = _mixed_rows(12)
    rows[3]["instruction"] = "ünïcödé ✓ \"quoted\""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_examples(str(tmp_path / "d.jsonl"))
    assert data_fingerprint(loaded) == data_fingerprint(normalise(rows))
    assert data_fingerprint(sample_rows(loaded, 5, seed=2)) == data_fingerprint(
        sample_rows(normalise(rows), 5, seed=2))


def test_examples_file_is_removed_with_the_last_view(tmp_path, monkeypatch):
    import gc

    import sealft.models

    monkeypatch.setattr(sealft.models, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _mixed_rows(5)))
    loaded = load_examples(str(tmp_path / "d.jsonl"))
    view = loaded.take([1])
    folders = list((tmp_path / "cache" / "examples").iterdir())
    assert len(folders) == 1
    del loaded
    gc.collect()
    assert folders[0].exists() and view[0]["index"] == 1  # the view still holds the file
    del view
    gc.collect()
    assert not folders[0].exists()


def test_a_template_error_skips_only_its_row(tiny_model):
    """Rows are rendered in batches; a row the template refuses is skipped with the
    template's message, and the batch's other rows tokenise as they do alone."""
    from sealft.models import load_tokenizer
    from sealft.tokenize import tokenize_examples

    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": f"the movie {i}"},
                          {"role": "assistant", "content": "great"}]} for i in range(3)]
    rows.insert(1, {"messages": [{"role": "system", "content": "be nice"},
                                 {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]})
    examples = normalise(rows, "rows")
    together = tokenize_examples(examples, tokenizer, 64, cache=False)
    assert list(together.rows) == [0, 2, 3]
    assert together.skipped == {examples[1]["id"]: "chat template error: no system turns"}
    alone = tokenize_examples([examples[2]], tokenizer, 64, cache=False)
    assert together.input_ids[1] == alone.input_ids[0]
    assert together.labels[1] == alone.labels[0]


def test_runs_started_together_each_assemble_the_offline_model(tmp_path, monkeypatch):
    """Two fine-tuning runs launched side by side on a new machine both find the multi-part
    GGUF unassembled; each must end with the verified file, not a rename of the other's copy
    from under it."""
    import dataclasses
    import hashlib
    import os
    import threading

    import sealft.models as models

    parts = [tmp_path / f"part{i}.bin" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 5000)
    whole = b"".join(p.read_bytes() for p in parts)
    spec = models.OfflineModel(packages=("a", "b", "c"), files=("0", "1", "2"),
                               gguf_name="toy.gguf", install="pip install toy",
                               sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(models, "OFFLINE_MODELS", {"toy/model": spec})
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(models, "_package_file", lambda package, relative: parts[int(relative)])
    callers = 3
    # every caller has written its copy before any moves it into place
    written = threading.Barrier(callers, timeout=30)
    real_replace = os.replace

    def replace_after_all_wrote(source, target):
        written.wait()
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_all_wrote)
    found, failed = [], []

    def assemble():
        try:
            found.append(models.offline_gguf("toy/model"))
        except Exception as err:  # noqa: BLE001 - the test reports what any caller raised
            failed.append(err)

    threads = [threading.Thread(target=assemble) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == [] and len(found) == callers
    assert {p.read_bytes() for p in found} == {whole}
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == ["toy.gguf"]
    # parts that do not add up to the recorded digest: an error, and no file left behind
    monkeypatch.setattr(models, "OFFLINE_MODELS", {"toy/model": dataclasses.replace(
        spec, gguf_name="bad.gguf", sha256="0" * 64)})
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(models.ModelError, match="reinstall the packages"):
        models.offline_gguf("toy/model")
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == ["toy.gguf"]
