"""Data formats, ids and input errors."""

from __future__ import annotations

import json

import pytest

from sealft.data import detect_format, example_id, load_examples, normalise
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
