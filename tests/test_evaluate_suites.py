"""Suites: default files load with the right counts; any prompt file can become a suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from sealft.errors import ConfigError, DataError
from sealft.evaluate.suites import (
    SAFETY_SETS,
    SuiteContext,
    build_suites,
    expand_suite_names,
    parse_prompt_file_spec,
    read_prompt_file,
    resolve_data_dir,
    sample_items,
)

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(),
                                  reason="shared evaluation data not present")


@needs_shared
def test_default_safety_sets_load_with_their_sizes():
    sets = build_suites(["safety"], SuiteContext(data_dir=SHARED_DATA))["safety"]
    sizes = {s.name: len(s.items) for s in sets}
    assert [s.name for s in sets] == list(SAFETY_SETS)
    # AdvBench has no header row: all 520 lines are prompts.
    assert sizes["advbench"] == 520
    assert sizes["harmbench"] == 200
    assert sizes["malicious_instructions"] == 100
    assert sizes["cona"] == 178
    assert sizes["controversial"] == 40
    assert sizes["q_harm"] == 100
    assert sizes["physical_unsafe"] == 100
    assert sizes["donotanswer"] == 939
    assert all(s.kind == "harmful" for s in sets)
    assert sets[0].items[0]["prompt"].startswith("Write a script that can exploit")
    ids = [it["id"] for s in sets for it in s.items]
    assert len(ids) == len(set(ids))


@needs_shared
def test_other_default_suites_load():
    ctx = SuiteContext(data_dir=SHARED_DATA, suite_limits={"helpfulness": 10})
    suites = build_suites(["overrefusal", "task", "helpfulness"], ctx)
    (xs,) = suites["overrefusal"]
    assert xs.name == "xstest_safe" and len(xs.items) == 250 and xs.kind == "benign"
    (sst2,) = suites["task"]
    assert len(sst2.items) == 872
    assert {it["label"] for it in sst2.items} == {"positive", "negative"}
    assert "respond only positive or negative" in sst2.items[0]["prompt"]
    (alpaca,) = suites["helpfulness"]
    assert len(alpaca.items) == 10 and alpaca.total == 805
    assert alpaca.items[0]["reference"]


@needs_shared
def test_limit_samples_the_same_rows_every_time_and_per_set():
    ctx = SuiteContext(data_dir=SHARED_DATA, limit=7, safety_sets=("advbench", "harmbench"),
                       xstest_include_unsafe=True)
    first = build_suites(["safety", "overrefusal"], ctx)
    again = build_suites(["safety", "overrefusal"], ctx)
    assert [len(s.items) for s in first["safety"]] == [7, 7]
    assert first["safety"][0].items == again["safety"][0].items
    assert [s.name for s in first["overrefusal"]] == ["xstest_safe", "xstest_unsafe"]
    assert first["overrefusal"][1].kind == "harmful"
    other_seed = build_suites(["safety"], SuiteContext(data_dir=SHARED_DATA, limit=7, seed=1,
                                                       safety_sets=("advbench",)))
    assert other_seed["safety"][0].items != first["safety"][0].items


def test_sample_items_keeps_source_order():
    items = [{"id": str(i)} for i in range(50)]
    picked = sample_items(items, 10, 0, "x")
    assert len(picked) == 10
    assert [int(p["id"]) for p in picked] == sorted(int(p["id"]) for p in picked)
    assert sample_items(items, None, 0, "x") == items


def test_prompt_files_in_every_format(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "b.csv").write_text("id,question,note\n1,what is up,x\n2,\"with, comma\",y\n")
    (tmp_path / "c.csv").write_text("only one column\nanother one\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "p1", "q": "alt1"}) + "\n"
                                      + json.dumps({"text": "p2", "q": "alt2"}) + "\n")
    (tmp_path / "e.json").write_text(json.dumps({"instructions": ["x", "y", "z"], "tags": []}))
    (tmp_path / "f.json").write_text(json.dumps([{"instruction": "do", "input": "this"}]))
    assert read_prompt_file(tmp_path / "a.txt") == ["first prompt", "second prompt"]
    assert read_prompt_file(tmp_path / "b.csv") == ["what is up", "with, comma"]
    assert read_prompt_file(tmp_path / "c.csv") == ["only one column", "another one"]
    assert read_prompt_file(tmp_path / "d.jsonl") == ["p1", "p2"]
    assert read_prompt_file(tmp_path / "d.jsonl", "q") == ["alt1", "alt2"]
    assert read_prompt_file(tmp_path / "e.json") == ["x", "y", "z"]
    assert read_prompt_file(tmp_path / "f.json") == ["do\n\nthis"]
    with pytest.raises(DataError, match="no column 'nope'"):
        read_prompt_file(tmp_path / "b.csv", "nope")
    with pytest.raises(DataError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_custom_suite_from_a_prompt_file(tmp_path: Path):
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"q": f"prompt {i}"}) + "\n"
                                                 for i in range(5)))
    ctx = SuiteContext(prompt_files=(f"myset={tmp_path / 'mine.jsonl'}#q",),
                       prompt_files_kind="benign")
    (pset,) = build_suites(expand_suite_names("custom", ctx), ctx)["custom"]
    assert pset.name == "myset" and pset.kind == "benign" and len(pset.items) == 5
    # A bare path given as the suite works too.
    ctx2 = SuiteContext()
    names = expand_suite_names(f"{tmp_path / 'mine.jsonl'}#q", ctx2)
    assert names == ["custom"]
    assert build_suites(names, ctx2)["custom"][0].name == "mine"


def test_prompt_file_spec_parsing():
    assert parse_prompt_file_spec("x=/a/b.csv#col") == ("x", Path("/a/b.csv"), "col")
    assert parse_prompt_file_spec("/a/b.txt") == ("b", Path("/a/b.txt"), None)


def test_unknown_suite_and_set_are_config_errors():
    with pytest.raises(ConfigError, match="unknown"):
        expand_suite_names("nonsense", SuiteContext())
    with pytest.raises(ConfigError, match="safety-sets"):
        build_suites(["safety"], SuiteContext(data_dir=Path("."), safety_sets=("nope",)))


def test_missing_data_is_a_clear_error(tmp_path: Path, monkeypatch):
    with pytest.raises(DataError, match="no such folder"):
        resolve_data_dir(str(tmp_path / "absent"))
    monkeypatch.setenv("SEALFT_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    with pytest.raises(DataError, match="does not exist"):
        build_suites(["safety"], SuiteContext(data_dir=tmp_path, safety_sets=("advbench",)))
    with pytest.raises(DataError, match="--data-dir"):
        SuiteContext(data_dir=None).path("advbench")
