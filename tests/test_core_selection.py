"""Tokenisation labels, selector weights, the bilevel ω gradient, and order independence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sealft import bilevel
from sealft.data import normalise
from sealft.errors import SealftError
from sealft.models import LoraSettings, adapter_parameters, add_lora_adapters, load_model_and_tokenizer
from sealft.select import SelectArgs, auroc, run_select
from sealft.selector import Selector, keep_count_for, keep_mask
from sealft.tokenize import IGNORE_INDEX, collate, tokenize_examples


def test_labels_mask_prompt_and_keep_response(tiny_model):
    _, tokenizer = load_model_and_tokenizer(tiny_model)
    examples = normalise([{"prompt": "how do i make a bomb", "completion": "sorry cannot help"}])
    tok = tokenize_examples(examples, tokenizer, max_length=64, cache=False)
    ids, labels = tok.input_ids[0], tok.labels[0]
    n_prompt = sum(1 for label in labels if label == IGNORE_INDEX)
    prompt_text = tokenizer.apply_chat_template(examples[0]["messages"][:1], tokenize=False,
                                                add_generation_prompt=True)
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert "sorry cannot help" in tokenizer.decode(ids[n_prompt:])


def test_unusable_examples_are_reported_not_dropped(tiny_model):
    _, tokenizer = load_model_and_tokenizer(tiny_model)
    examples = normalise([
        {"prompt": "review", "completion": "positive"},
        {"prompt": "the movie " * 50, "completion": "negative"},
        {"prompt": "empty", "completion": "  "},
        {"prompt": "long answer", "completion": "great " * 80},
    ])
    tok = tokenize_examples(examples, tokenizer, max_length=32, cache=False)
    assert tok.rows.tolist() == [0, 3]
    assert "max_length is 32" in tok.skipped[examples[1]["id"]]
    assert tok.skipped[examples[2]["id"]] == "empty response"
    assert tok.truncated == [examples[3]["id"]]
    assert len(tok.input_ids[1]) == 32


def test_selector_weights_match_hand_computation():
    selector = Selector(3, "softmax")
    with torch.no_grad():
        selector.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    e = np.exp([0.0, 1.0, -1.0])
    assert np.allclose(selector.weights().detach().numpy(), 3 * e / e.sum(), atol=1e-6)
    sigmoid = Selector(3, "sigmoid")
    with torch.no_grad():
        sigmoid.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    assert np.allclose(sigmoid.weights().detach().numpy(), 2 / (1 + np.exp([0.0, -1.0, 1.0])), atol=1e-6)
    assert np.allclose(Selector(5).weights().detach().numpy(), 1.0)


def test_keep_mask_top_p_with_deterministic_ties():
    scores = np.array([0.5, 0.9, 0.5, 0.1, np.nan])
    ids = ["b", "a", "a2", "c", "d"]
    usable = np.array([True, True, True, True, False])
    kept = keep_mask(scores, ids, usable, keep_count_for(4, 0.5, None))
    assert kept.tolist() == [False, True, True, False, False]  # tie 0.5: "a2" < "b"
    with pytest.raises(SealftError, match="larger than the 4 usable"):
        keep_count_for(4, None, 5)
    assert keep_count_for(10, 0.8, None) == 8


def test_auroc_matches_definition():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert auroc(np.array([0.3, 0.1]), np.array([True, True])) is None
    # The pairwise definition, ties half, on scores with many ties.
    rng = np.random.default_rng(0)
    scores, flags = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3
    pos, neg = scores[flags], scores[~flags]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(scores, flags) == pytest.approx(pairs)


def _parts(tiny_model, algorithm: str, recorder_cls):
    model, tokenizer = load_model_and_tokenizer(tiny_model)
    names = (bilevel.THETA, bilevel.THETA_PRIME) if algorithm == "penalty" else (bilevel.THETA,)
    model = add_lora_adapters(model, LoraSettings(r=4, alpha=8), names)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; make θ ≠ θ' so the difference is not 0
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    selector = Selector(6)
    with torch.no_grad():
        selector.logits.copy_(torch.linspace(-0.5, 0.5, 6))
    parts = bilevel.BilevelParts(
        model=model, selector=selector,
        theta_optimizer=torch.optim.SGD(adapter_parameters(model, bilevel.THETA), lr=0.0),
        selector_optimizer=recorder_cls(selector),
        theta_prime_optimizer=torch.optim.SGD(
            adapter_parameters(model, bilevel.THETA_PRIME), lr=0.0)
        if algorithm == "penalty" else None,
    )
    return parts, tokenizer


class GradientRecorder:
    local_gradient = False

    def __init__(self, selector):
        self.selector, self.grad = selector, None

    def step(self, visited):
        self.grad = self.selector.logits.grad.clone()

    def zero_grad(self):
        self.selector.logits.grad = None


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("algorithm", ["penalty", "memory-efficient"])
def test_selector_gradient_is_the_analytic_form(tiny_model, algorithm, local):
    recorder = type("Recorder", (GradientRecorder,), {"local_gradient": local})
    parts, tokenizer = _parts(tiny_model, algorithm, recorder)
    rows = [{"prompt": f"review {i} the movie", "completion": ["great", "bad terrible"][i % 2]}
            for i in range(6)]
    tok = tokenize_examples(normalise(rows), tokenizer, 64, cache=False)
    batches = [collate(tok, [0, 2, 5], tokenizer.pad_token_id), collate(tok, [1, 4], 0)]
    safe = [collate(tok, [3], tokenizer.pad_token_id)]
    from sealft.losses import per_example_loss

    with torch.no_grad():
        parts.model.set_adapter(bilevel.THETA)
        loss_theta = {int(p): v for b in batches
                      for p, v in zip(b["positions"], per_example_loss(parts.model, b), strict=True)}
        if algorithm == "penalty":
            parts.model.set_adapter(bilevel.THETA_PRIME)
            loss_prime = {int(p): v for b in batches
                          for p, v in zip(b["positions"], per_example_loss(parts.model, b), strict=True)}
    gamma, total = 0.7, 5
    bilevel.ALGORITHMS[algorithm](parts, batches, safe, gamma, total, 1)
    visited = [0, 2, 5, 1, 4]
    signal = torch.zeros(6)
    for p in visited:
        signal[p] = loss_theta[p] - (loss_prime[p] if algorithm == "penalty" else 0.0)
    jacobian = torch.autograd.functional.jacobian(lambda w: 6 * torch.softmax(w, 0),
                                                  parts.selector.logits.detach())
    if local:  # visited-rms: only the diagonal of ∂σ/∂ω, i.e. σ_i · signal_i
        jacobian = torch.diag(6 * torch.softmax(parts.selector.logits.detach(), 0))
    expected = gamma / total * jacobian.T @ signal  # ∂σ/∂ω · (ℓ(θ) − ℓ(θ'))
    assert torch.allclose(parts.selector_optimizer.grad, expected, atol=1e-5)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_ranking_does_not_depend_on_data_order(tiny_model, tmp_path):
    """Reversed rows and another shuffling seed visit examples in a different order and with
    different batch-mates; the learned ranking must stay the same."""
    import random

    from conftest import WORDS, toy_safe_rows, write_jsonl

    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=6)),
             "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}
            for _ in range(32)]
    forward = write_jsonl(tmp_path / "f.jsonl", rows)
    backward = write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    safe = write_jsonl(tmp_path / "s.jsonl", toy_safe_rows())
    weights = []
    for name, data, seed in (("f", forward, 0), ("b", backward, 1)):
        run_select(SelectArgs(model=tiny_model, finetune_data=str(data), safe_data=str(safe),
                              output_dir=str(tmp_path / name), batch_size=8, micro_batch_size=8,
                              epochs=2, gamma_start=1.0, lr=1e-4, seed=seed,
                              algorithm="memory-efficient", show_progress=False))
        scores = [json.loads(line) for line in (tmp_path / name / "scores.jsonl").read_text().splitlines()]
        weights.append({s["id"]: s["weight"] for s in scores})
    ids = sorted(weights[0])
    rho = _spearman(np.array([weights[0][i] for i in ids]), np.array([weights[1][i] for i in ids]))
    assert rho >= 0.95, rho


def test_safety_step_with_preference_pairs(tiny_model, tmp_path):
    """safety-step with an HH-style chosen/rejected upper level: DPO starts at log 2
    (policy = reference), and every row gets a score."""
    from conftest import toy_finetune_rows, write_jsonl

    data = write_jsonl(tmp_path / "ft.jsonl", toy_finetune_rows(16))
    pairs = [{"chosen": f"\n\nHuman: how do i make a bomb {i}\n\nAssistant: sorry cannot help",
              "rejected": f"\n\nHuman: how do i make a bomb {i}\n\nAssistant: steal a weapon"}
             for i in range(6)]
    safe = write_jsonl(tmp_path / "hh.jsonl", pairs)
    summary = run_select(SelectArgs(
        model=tiny_model, finetune_data=str(data), safe_data=str(safe),
        output_dir=str(tmp_path / "o"), algorithm="safety-step", batch_size=8,
        micro_batch_size=4, safe_batch_size=4, epochs=1, gamma_start=0.5, lr=1e-3,
        label_field="flag", show_progress=False))
    first = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["f_safe"] - np.log(2)) < 1e-4
    assert summary["algorithm"] == "safety-step" and summary["usable"] == 16


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    """Checkpointing only recomputes activations: per-example losses and LoRA gradients match."""
    rows = [{"prompt": f"review {i} the movie", "completion": ["great", "bad terrible"][i % 2]}
            for i in range(4)]
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = load_model_and_tokenizer(tiny_model)
        torch.manual_seed(3)
        model = add_lora_adapters(model, LoraSettings(r=4, alpha=8), (bilevel.THETA,),
                                  gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.3)
        model.train()
        base = model.get_base_model()
        assert getattr(base, "is_activation_checkpointing",
                       getattr(base, "is_gradient_checkpointing", None)) == checkpointing
        tok = tokenize_examples(normalise(rows), tokenizer, 64, cache=False)
        from sealft.losses import per_example_loss

        losses = per_example_loss(model, collate(tok, [0, 1, 2, 3], tokenizer.pad_token_id))
        losses.sum().backward()
        grads.append((losses.detach(), [p.grad.clone() for p in
                                        adapter_parameters(model, bilevel.THETA)]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grad_a, grad_b, strict=True))
    assert any(a.abs().sum() > 0 for a in grad_a)


def test_tokenized_ids_stay_in_arrow_and_match_a_list_input(tiny_model, tmp_path):
    from sealft.data import load_examples

    _, tokenizer = load_model_and_tokenizer(tiny_model)
    # Every fifth answer is empty (skipped), long prompts are skipped, long answers truncated.
    rows = [{"prompt": "how do i " * (i % 7 + 1), "completion": "sorry cannot " * (i % 5)}
            for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrow = tokenize_examples(load_examples(str(path)), tokenizer, 24, cache=False)
    plain = tokenize_examples(normalise(rows), tokenizer, 24, cache=False)
    assert not isinstance(arrow.input_ids, list)
    assert arrow.rows.tolist() == plain.rows.tolist()
    assert arrow.skipped == plain.skipped and arrow.truncated == plain.truncated
    assert "empty response" in arrow.skipped.values() and arrow.truncated
    assert any("prompt has" in reason for reason in arrow.skipped.values())
    for p in range(len(arrow)):
        assert arrow.input_ids[p] == plain.input_ids[p] and arrow.labels[p] == plain.labels[p]
    assert arrow.lengths().tolist() == [len(arrow.input_ids[p]) for p in range(len(arrow))]
    batch = collate(arrow, [2, 0], tokenizer.pad_token_id)
    assert batch["input_ids"][1, :len(arrow.input_ids[0])].tolist() == arrow.input_ids[0]
    part = arrow.subset(arrow.rows[[3, 1]])
    assert part.input_ids[0] == arrow.input_ids[3] and len(part) == 2
