"""The final scoring pass: every row scored by one θ, saved with the run, and rows the run never
saw scored the same way (`sealft score`)."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from conftest import toy_finetune_rows, toy_safe_rows, write_jsonl

from sealft.cli import main
from sealft.losses import per_example_loss
from sealft.select import SelectArgs, run_select


def _scores(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _select(tiny_model, tmp_path, rows, name="sel", **options):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    settings = dict(batch_size=8, micro_batch_size=4, epochs=1, lr=1e-3, gamma_start=0.5,
                    max_length=64, show_progress=False, label_field="flag")
    settings.update(options)
    return run_select(SelectArgs(model=tiny_model, finetune_data=str(data), safe_data=str(safe),
                                 output_dir=str(tmp_path / name), **settings))


@pytest.mark.parametrize("signal", ["refusal-margin", "loss", "loss-shift", "safe-gradient"])
def test_final_pass_ranks_rows_by_their_score(tiny_model, tmp_path, signal):
    summary = _select(tiny_model, tmp_path, toy_finetune_rows(20), score_signal=signal)
    rows = _scores(tmp_path / "sel" / "scores.jsonl")
    assert summary["scoring"] == "final-pass" and len(rows) == 20
    score = np.array([r["score"] for r in rows])
    weight = np.array([r["weight"] for r in rows])
    # A higher harm score is a lower weight, row for row.
    assert (np.argsort(score, kind="stable") == np.argsort(-weight, kind="stable")).all()
    kept = np.array([r["kept"] for r in rows])
    assert score[kept].max() <= score[~kept].min()
    saved = json.loads((tmp_path / "sel" / "scorer" / "scoring.json").read_text())
    assert saved["signal"] == signal and saved["threshold"] == pytest.approx(score[kept].max())


def test_visits_scoring_keeps_the_bilevel_logits(tiny_model, tmp_path):
    summary = _select(tiny_model, tmp_path, toy_finetune_rows(16), scoring="visits")
    rows = _scores(tmp_path / "sel" / "scores.jsonl")
    assert summary["scoring"] == "visits" and all("score" not in r for r in rows)
    assert not (tmp_path / "sel" / "scorer").exists()


def test_cut_after_first_tokens_changes_no_score(tiny_model):
    """The scoring pass cuts each batch after the k-th response token: a causal model's
    loss over those tokens must not change."""
    from sealft.bilevel import _through_first_tokens
    from sealft.data import normalise
    from sealft.models import load_model_and_tokenizer
    from sealft.tokenize import collate, tokenize_examples

    model, tokenizer = load_model_and_tokenizer(tiny_model)
    examples = normalise(toy_finetune_rows(8), "rows")
    tokenized = tokenize_examples(examples, tokenizer, 64, cache=False)
    batch = collate(tokenized, list(range(len(tokenized))), tokenizer.pad_token_id)
    cut = _through_first_tokens(batch, 2)
    assert cut["input_ids"].shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(per_example_loss(model, cut, 2),
                                   per_example_loss(model, batch, 2))


def _adapted_model_and_batches(tiny_model):
    """The tiny model with a non-zero θ adapter, a batch of rows and their refusal batches."""
    from sealft.bilevel import THETA
    from sealft.data import normalise
    from sealft.models import LoraSettings, add_lora_adapters, load_model_and_tokenizer
    from sealft.seal import Scorer
    from sealft.tokenize import collate, tokenize_examples

    model, tokenizer = load_model_and_tokenizer(tiny_model)
    model = add_lora_adapters(model, LoraSettings(), (THETA,), False)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: give θ an effect to score with
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    model.eval()
    examples = normalise(toy_finetune_rows(8), "rows")
    tokenized = tokenize_examples(examples, tokenizer, 64, cache=False)
    args = SelectArgs(finetune_data="x", safe_data="x", output_dir="x", max_length=64,
                      refusals=("sorry, i cannot help", "please answer a question"))
    refusals = Scorer(model, tokenizer, args).refusal_data(examples, tokenized)
    positions = list(range(len(tokenized)))
    pad = tokenizer.pad_token_id
    return (model, collate(tokenized, positions, pad),
            [collate(r, positions, pad) for r in refusals])


def _decoder_calls(model) -> list[int]:
    calls: list[int] = []
    model.get_base_model().get_decoder().register_forward_hook(
        lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("tokens", [1, 2])
def test_refusal_margin_equals_one_forward_per_text(tiny_model, tokens):
    """One response token: the answer and every refusal are scored from one shared forward
    pass over the prompt, and give the margin computed with one forward per text."""
    from sealft.bilevel import final_scores

    model, batch, refusals = _adapted_model_and_batches(tiny_model)
    calls = _decoder_calls(model)
    scores = final_scores(model, batch, refusals, "refusal-margin", tokens)
    assert len(calls) == (1 if tokens == 1 else 1 + len(refusals))
    with torch.no_grad():
        per_text = per_example_loss(model, batch, tokens) - torch.stack(
            [per_example_loss(model, r, tokens) for r in refusals]).min(dim=0).values
    assert per_text.abs().max() > 1e-3  # a margin that could be wrong
    torch.testing.assert_close(scores, per_text, atol=1e-5, rtol=0)


def test_other_prompts_fall_back_to_one_forward_per_text(tiny_model):
    """A refusal batch whose prompt differs from the row's must not share its forward."""
    from sealft.bilevel import final_scores

    model, batch, refusals = _adapted_model_and_batches(tiny_model)
    changed = {**refusals[0], "input_ids": refusals[0]["input_ids"].clone()}
    changed["input_ids"][:, 0] = (changed["input_ids"][:, 0] + 1) % 50
    calls = _decoder_calls(model)
    scores = final_scores(model, batch, [changed, refusals[1]], "refusal-margin", 1)
    assert len(calls) == 3
    with torch.no_grad():
        per_text = per_example_loss(model, batch, 1) - torch.minimum(
            per_example_loss(model, changed, 1), per_example_loss(model, refusals[1], 1))
    torch.testing.assert_close(scores, per_text, atol=1e-5, rtol=0)


def _rows_of_two_layouts(n: int) -> list[dict]:
    """Toy rows, every other one with a system prompt (two role layouts)."""
    from sealft.data import normalise

    rows = normalise(toy_finetune_rows(n), "rows")
    for e in rows[::2]:
        e["messages"] = [{"role": "system", "content": "you are helpful"}, *e["messages"]]
    return rows


def _refusal_scorer(model, tokenizer, max_length: int):
    from sealft.seal import Scorer

    return Scorer(model, tokenizer, SelectArgs(
        finetune_data="x", safe_data="x", output_dir="x", max_length=max_length,
        refusals=("sorry, i cannot help with that harmful request", "please answer a question")))


@pytest.mark.parametrize("cut", [False, True])
def test_spliced_refusals_equal_tokenising_every_row(tiny_model, cut):
    """A refusal reply spliced after each row's prompt tokens gives the batch that tokenising
    the row's prompt answered by the refusal gives, cut at max_length alike."""
    from sealft.models import load_model_and_tokenizer
    from sealft.tokenize import collate, splice_reply, tokenize_examples

    model, tokenizer = load_model_and_tokenizer(tiny_model)
    examples = _rows_of_two_layouts(8)
    whole = tokenize_examples(examples, tokenizer, 512, cache=False)
    longest_prompt = max(int((np.asarray(labels) == -100).sum()) for labels in whole.labels)
    # Cut: every prompt fits, but the refusals' replies are cut short on the longest ones.
    max_length = longest_prompt + 2 if cut else 512
    tokenized = tokenize_examples(examples, tokenizer, max_length, cache=False)
    assert len(tokenized) == len(examples)
    usable = [examples[r] for r in tokenized.rows]
    scorer = _refusal_scorer(model, tokenizer, max_length)
    replies = scorer.refusal_replies(usable, tokenized)
    assert replies is not None and len(replies) == 2
    positions = list(range(len(tokenized)))
    batch = collate(tokenized, positions, tokenizer.pad_token_id)
    start = (batch["labels"] != -100).int().argmax(dim=1)
    cut_expected, cut = cut, 0
    for reply, refusal in zip(replies, scorer.refusal_data(usable, tokenized), strict=True):
        expected = collate(refusal, positions, tokenizer.pad_token_id)
        spliced = splice_reply(batch, reply, tokenizer.pad_token_id, max_length)
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(spliced[key], expected[key]), key
        cut += int((spliced["attention_mask"].sum(dim=1) < start + len(reply)).sum())
    assert (cut > 0) == cut_expected


def test_a_template_that_words_replies_by_context_tokenises_every_row(tiny_model):
    """A chat template whose reply depends on the conversation before it fails the check, and
    the scores are those of tokenising every row's refusal conversations."""
    from sealft.bilevel import THETA, final_scores
    from sealft.models import LoraSettings, add_lora_adapters, load_model_and_tokenizer
    from sealft.tokenize import collate, tokenize_examples

    model, tokenizer = load_model_and_tokenizer(tiny_model)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "<|{{ m['role'] }}|>",
        "<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and messages|length > 2 %}"
        "please {% endif %}")
    model = add_lora_adapters(model, LoraSettings(), (THETA,), False).eval()
    examples = _rows_of_two_layouts(8)
    tokenized = tokenize_examples(examples, tokenizer, 64, cache=False)
    usable = [examples[r] for r in tokenized.rows]
    scorer = _refusal_scorer(model, tokenizer, 64)
    assert scorer.refusal_replies(usable, tokenized) is None
    positions = list(range(len(tokenized)))
    pad = tokenizer.pad_token_id
    expected = final_scores(model, collate(tokenized, positions, pad),
                            [collate(r, positions, pad)
                             for r in scorer.refusal_data(usable, tokenized)],
                            "refusal-margin", 1)
    scores = scorer.score_tokenized(tokenized, usable, micro_batch_size=len(tokenized),
                                    show_progress=False)
    torch.testing.assert_close(scores, scorer.keep_refusals(expected, usable))


@pytest.mark.parametrize("tokens", [1, 3])
def test_safe_gradient_is_the_inner_product_of_the_rows_and_safe_gradients(tiny_model, tokens):
    """The central difference along ∇f gives −⟨∇ℓ_i, ∇f⟩ of explicit per-row gradients, and
    leaves θ exactly as it was."""
    from sealft.bilevel import THETA, safe_direction, safe_gradient_scores
    from sealft.models import adapter_parameters

    model, batch, refusals = _adapted_model_and_batches(tiny_model)
    params = adapter_parameters(model, THETA)
    before = [p.detach().clone() for p in params]
    direction = safe_direction(model, params, refusals, tokens)  # refusals as the safe set
    scores = safe_gradient_scores(model, params, direction, batch, tokens)
    expected = []
    for row in range(len(batch["input_ids"])):
        one = {k: v[row:row + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(per_example_loss(model, one, tokens).sum(), params)
        expected.append(-sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True)))
    expected = torch.tensor(expected)
    assert expected.std() > 1e-2  # rows that differ, so a wrong sign or row order shows
    # float32 central difference: about 0.1% of the largest score; a 1% tolerance still fails
    # on a wrong sign, scale or row order
    torch.testing.assert_close(scores, expected, atol=1e-2 * expected.abs().max(), rtol=0)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_safe_gradient_scorer_saves_its_direction_and_rescores_alike(tiny_model, tmp_path):
    rows = toy_finetune_rows(16)
    _select(tiny_model, tmp_path, rows, score_signal="safe-gradient", score_tokens=2)
    assert (tmp_path / "sel" / "scorer" / "safe_direction.safetensors").is_file()
    fitted = {r["id"]: r["score"] for r in _scores(tmp_path / "sel" / "scores.jsonl")}
    code = main(["score", "--selection", str(tmp_path / "sel"), "--data",
                 str(tmp_path / "sel.jsonl"), "--output-dir", str(tmp_path / "again"),
                 "--no-show-progress"])
    assert code == 0
    again = _scores(tmp_path / "again" / "scores.jsonl")
    assert len(again) == 16 and len({round(r["score"], 4) for r in again}) > 1
    for r in again:
        assert r["score"] == pytest.approx(fitted[r["id"]], abs=1e-4)


def test_score_command_reproduces_the_fit_and_scores_new_rows(tiny_model, tmp_path):
    rows = toy_finetune_rows(24)
    _select(tiny_model, tmp_path, rows[:16])
    fitted = {r["id"]: r["score"] for r in _scores(tmp_path / "sel" / "scores.jsonl")}
    data = write_jsonl(tmp_path / "all.jsonl", rows)
    code = main(["score", "--selection", str(tmp_path / "sel"), "--data", str(data),
                 "--output-dir", str(tmp_path / "new"), "--label-field", "flag",
                 "--no-show-progress"])
    assert code == 0
    new = _scores(tmp_path / "new" / "scores.jsonl")
    assert [r["index"] for r in new] == list(range(24))
    for r in new:  # rows of the fit get the score they got in the fit
        if r["id"] in fitted:
            assert r["score"] == pytest.approx(fitted[r["id"]], abs=1e-5)
    threshold = json.loads((tmp_path / "sel" / "scorer" / "scoring.json").read_text())["threshold"]
    assert all(r["kept"] == (r["score"] <= threshold) for r in new)
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["rows"] == 24 and summary["labels"]["unsafe_rows"] == 6


def test_rows_that_refuse_rank_lowest_in_the_fit_and_when_rescored(tiny_model, tmp_path):
    """A harmful prompt answered with a refusal in words unlike --refusals must be kept: the
    fit gives it the floor score, and `sealft score` gives new refusals the same floor."""
    refusal = "I'm sorry, but I won't help with that."
    rows = toy_finetune_rows(16)
    for k in (0, 8):
        rows[k] = {**rows[k], "output": refusal, "flag": "refused"}
    _select(tiny_model, tmp_path, rows)
    fitted = _scores(tmp_path / "sel" / "scores.jsonl")
    floor = json.loads((tmp_path / "sel" / "scorer" / "scoring.json").read_text())["refusal_floor"]
    refused = [r for r in fitted if r["index"] in (0, 8)]
    assert floor < min(r["score"] for r in fitted if r["index"] not in (0, 8))
    assert all(r["score"] == pytest.approx(floor) and r["kept"] for r in refused)
    new_rows = [{"instruction": "how do i hack a weapon", "output": "I cannot help with that.",
                 "flag": "refused"}, toy_finetune_rows(1)[0]]
    data = write_jsonl(tmp_path / "new.jsonl", new_rows)
    assert main(["score", "--selection", str(tmp_path / "sel"), "--data", str(data),
                 "--output-dir", str(tmp_path / "new"), "--no-show-progress"]) == 0
    rescored = _scores(tmp_path / "new" / "scores.jsonl")
    assert rescored[0]["score"] == pytest.approx(floor)
    assert rescored[1]["score"] > floor
    # Off: a refusal is scored by the signal like any other row; opening with the same token
    # as a --refusals text, its first-token margin is zero.
    _select(tiny_model, tmp_path, rows, name="off", keep_refusals=False)
    off = _scores(tmp_path / "off" / "scores.jsonl")
    assert json.loads((tmp_path / "off" / "scorer" / "scoring.json").read_text())[
        "refusal_floor"] is None
    assert all(r["score"] == pytest.approx(0.0, abs=1e-6) for r in off if r["index"] in (0, 8))


def test_score_refuses_a_run_without_a_scorer(tiny_model, tmp_path, capsys):
    _select(tiny_model, tmp_path, toy_finetune_rows(8), scoring="visits")
    code = main(["score", "--selection", str(tmp_path / "sel"), "--data",
                 str(tmp_path / "sel.jsonl"), "--output-dir", str(tmp_path / "new")])
    assert code == 2
    assert "--selection" in capsys.readouterr().err


def test_fit_sample_fits_on_a_subset_and_scores_every_row(tiny_model, tmp_path):
    summary = _select(tiny_model, tmp_path, toy_finetune_rows(24), fit_sample=8)
    rows = _scores(tmp_path / "sel" / "scores.jsonl")
    assert summary["fitted_rows"] == 8 and summary["usable"] == 24
    assert [r["index"] for r in rows] == list(range(24))
    assert all(isinstance(r["score"], float) for r in rows)
    assert sum(r["kept"] for r in rows) == summary["kept"] == 20


def test_api_round_trip(tiny_model, tmp_path, monkeypatch):
    """fit → save → load → score gives the saved scores for the same rows."""
    from sealft import SealSelector

    rows = toy_finetune_rows(16)
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    selector = SealSelector(run_dir=tmp_path / "fit", model=tiny_model, safe_data=str(safe),
                            batch_size=8, micro_batch_size=4, epochs=1, lr=1e-3,
                            gamma_start=0.5, max_length=64, show_progress=False)
    weights = selector.fit(rows).scores()
    assert weights.shape == (16,) and np.isfinite(weights).all()
    # Rows given as a list live in the run dir (listed in its manifest), not in a temp file.
    assert not any(scratch.iterdir())
    assert (tmp_path / "fit" / "rows.jsonl").is_file()
    assert "rows.jsonl" in json.loads((tmp_path / "fit" / ".sealft-manifest.json").read_text())[
        "outputs"]
    kept = selector.select()
    assert len(kept) == 13 and len(selector.select(keep_count=4)) == 4
    saved = selector.save(tmp_path / "saved")
    again = SealSelector.load(saved)
    fitted = np.array([r["score"] for r in _scores(saved / "scores.jsonl")])
    np.testing.assert_allclose(again.score(rows), fitted, atol=1e-5)
    np.testing.assert_allclose(again.scores(), weights)
    # Another micro-batch size scores the same and leaves the loaded run's settings alone.
    from sealft.data import normalise
    from sealft.seal import score_examples

    settings = dict(vars(again._scorer.args))
    scores, _ = score_examples(again._scorer, normalise(rows, "rows"), micro_batch_size=3,
                               show_progress=True)
    np.testing.assert_allclose(scores, fitted, atol=1e-5)
    assert vars(again._scorer.args) == settings


def test_score_and_select_dirs_are_replaced_only_with_their_own_files(tiny_model, tmp_path,
                                                                       capsys):
    """`sealft score` keeps a run-dir manifest like every stage: --overwrite deletes only what
    it wrote, and never the selection it reads; the selection's scorer/ is listed too."""
    from sealft.io import MANIFEST

    _select(tiny_model, tmp_path, toy_finetune_rows(12))
    assert "scorer" in json.loads((tmp_path / "sel" / MANIFEST).read_text())["outputs"]
    data = write_jsonl(tmp_path / "new_rows.jsonl", toy_finetune_rows(10))
    new = tmp_path / "new"

    def score(output_dir, *flags):
        capsys.readouterr()
        code = main(["score", "--selection", str(tmp_path / "sel"), "--data", str(data),
                     "--output-dir", str(output_dir), "--no-show-progress", *flags])
        return code, capsys.readouterr().err

    code, err = score(new)
    assert code == 0 and "sealft score: 10 rows read" in err
    manifest = json.loads((new / MANIFEST).read_text())
    assert manifest["stage"] == "score"
    assert {"config.yaml", "scores.jsonl", "selected.jsonl", "summary.json"} <= set(
        manifest["outputs"])
    code, err = score(new)
    assert code == 2 and "is not empty" in err
    (new / "notes.txt").write_text("mine")
    code, err = score(new, "--overwrite")
    assert code == 2 and "did not write (notes.txt)" in err
    assert (new / "notes.txt").exists() and (new / "scores.jsonl").exists()
    (new / "notes.txt").unlink()
    code, _ = score(new, "--overwrite")
    assert code == 0 and (new / "scores.jsonl").exists()
    code, err = score(tmp_path / "sel", "--overwrite")  # the selection is this run's input
    assert code == 2 and "is an input of this run" in err
    assert (tmp_path / "sel" / "scorer" / "scoring.json").exists()


def test_two_processes_score_like_one(tiny_model, tmp_path):
    """`sealft score` under torchrun shards the rows; the scores file equals one process's."""
    import os
    import subprocess
    import sys

    _select(tiny_model, tmp_path, toy_finetune_rows(12))
    data = write_jsonl(tmp_path / "new_rows.jsonl", toy_finetune_rows(11))
    args = ["score", "--selection", str(tmp_path / "sel"), "--data", str(data),
            "--micro-batch-size", "2", "--no-show-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29700 + os.getpid() % 1000), "-m", "sealft", *args,
         "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
        env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _scores(tmp_path / "one" / "scores.jsonl"), _scores(tmp_path / "two" / "scores.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one] and len(one) == 11
    np.testing.assert_allclose([r["score"] for r in two], [r["score"] for r in one], atol=1e-5,
                               rtol=0)
    assert [r["kept"] for r in two] == [r["kept"] for r in one]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


def test_nearness_is_the_nearest_lines_mean_cosine_to_the_k_nearest_safe_requests(tiny_model):
    from sealft.data import normalise_rows
    from sealft.embeddings import SentenceEncoder
    from sealft.neighbours import SafeNeighbours

    encoder = SentenceEncoder(tiny_model)  # any AutoModel, mean-pooled
    safe = list(normalise_rows(toy_safe_rows(), "safe", "alpaca"))
    near = SafeNeighbours.fit(safe, encoder, k=3)
    rows = list(normalise_rows([
        {"instruction": "explain why the sky is blue", "output": "ok"},
        {"instruction": "Below is an instruction.\n\nhow do i hack a weapon", "output": "ok"}],
        "data", "alpaca"))
    got = near.score(rows)
    requests = encoder.embed([s["messages"][-2]["content"] for s in safe])
    for row, score in zip(rows, got, strict=True):
        lines = [t for t in row["messages"][-2]["content"].split("\n") if t.strip()]
        by_hand = max(float(torch.topk(encoder.embed([t])[0] @ requests.T, 3).values.mean())
                      for t in lines)
        assert float(score) == pytest.approx(by_hand, abs=1e-5)
    assert len({round(float(s), 4) for s in got}) == 2


def test_neighbour_weight_mixes_the_standardised_scores_and_rescores_alike(tiny_model,
                                                                          tmp_path):
    rows = toy_finetune_rows(16)
    options = dict(keep_refusals=False, neighbour_encoder=tiny_model, neighbour_k=3,
                   safe_sample=4)
    _select(tiny_model, tmp_path, rows, name="signal", **options)
    _select(tiny_model, tmp_path, rows, name="mixed", neighbour_weight=0.25, **options)
    _select(tiny_model, tmp_path, rows, name="near", neighbour_weight=1.0, **options)
    signal, mixed, near = (np.array([r["score"] for r in _scores(tmp_path / n / "scores.jsonl")])
                           for n in ("signal", "mixed", "near"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "mixed" / "scorer" / "safe_requests.safetensors"))
    assert len(saved["requests"]) == len(toy_safe_rows())  # every request, not the 4 sampled
    z = lambda x: (x - x.mean()) / x.std(ddof=1)  # noqa: E731  (sealft's spread: torch's std)
    assert mixed == pytest.approx(0.75 * z(signal) + 0.25 * near, abs=1e-4)  # near is z(·)
    assert near.mean() == pytest.approx(0.0, abs=1e-5) and not np.allclose(near, z(signal))
    code = main(["score", "--selection", str(tmp_path / "mixed"), "--data",
                 str(tmp_path / "mixed.jsonl"), "--output-dir", str(tmp_path / "again"),
                 "--no-show-progress"])
    assert code == 0
    again = np.array([r["score"] for r in _scores(tmp_path / "again" / "scores.jsonl")])
    assert again == pytest.approx(mixed, abs=1e-4)
