"""Fit the SEAL selector: build the model, adapters and optimisers, then run the bilevel step
(`bilevel.py`) inside the shared loop (`train.py`)."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sealft import bilevel, neighbours
from sealft.data import Example, ids_at
from sealft.embeddings import SentenceEncoder
from sealft.errors import ConfigError
from sealft.models import (
    adapter_parameters,
    add_lora_adapters,
    load_model_and_tokenizer,
)
from sealft.neighbours import SafeNeighbours
from sealft.refusal import is_refusal
from sealft.runtime import (
    finish_logging,
    gradient_sync,
    log_metrics,
    lora_settings,
    make_accelerator,
    require_data_parallel,
)
from sealft.selection_run import SCORER_DIR, SCORING_FILE
from sealft.selector import Selector, keep_count_for, spread
from sealft.tokenize import (
    IGNORE_INDEX,
    Tokenized,
    collate,
    splice_reply,
    tokenize_examples,
    tokenize_inputs,
)
from sealft.train import LoopSettings, adapter_checkpoint, train_loop

DIRECTION_FILE = "safe_direction.safetensors"
"""safe-gradient runs: ∇f(θ) of the fit's safe set, one tensor per θ parameter."""
NEIGHBOURS_FILE = "safe_requests.safetensors"
"""--neighbour-weight runs: the safe set's requests, embedded (sealft.neighbours)."""


def fit_subset(tokenized: Tokenized, sample: int | None, seed: int) -> Tokenized:
    """The rows the bilevel problem is fitted on: all, or a seeded sample of `sample` usable
    rows (input order kept); the scoring pass then scores every row with the fitted θ."""
    if not sample or sample >= len(tokenized):
        return tokenized
    return tokenized.subset(fit_sample_rows(list(tokenized.rows), sample, seed))


def fit_sample_rows(usable_rows: list[int], sample: int, seed: int) -> list[int]:
    """The input rows `select --fit-sample` fits on, from the usable rows' input positions
    (so that a run's fitted rows can be told from its unseen ones afterwards)."""
    import random

    return sorted(random.Random(seed).sample(list(usable_rows), sample))


def selector_adapters(algorithm: str) -> tuple[str, ...]:
    """The LoRA adapters an algorithm trains: θ, plus θ' for the Algorithm 1 variants."""
    if algorithm in ("penalty", "safety-step"):
        return (bilevel.THETA, bilevel.THETA_PRIME)
    return (bilevel.THETA,)


def bilevel_parts(model, rows: int, args, sync=None) -> bilevel.BilevelParts:
    """The selector over `rows` rows and the optimisers of one bilevel fit, on `model` (which
    carries `selector_adapters(args.algorithm)`). `sync`: gradient all-reduce across
    processes (none on one process)."""
    device = next(model.parameters()).device
    selector = Selector(rows, args.weighting).to(device)
    optimizer_cls = bilevel.SELECTOR_OPTIMIZERS[args.selector_optimizer]
    two_adapters = bilevel.THETA_PRIME in selector_adapters(args.algorithm)
    return bilevel.BilevelParts(
        model=model,
        selector=selector,
        theta_optimizer=torch.optim.Adam(adapter_parameters(model, bilevel.THETA), lr=args.lr),
        selector_optimizer=optimizer_cls(selector, args.selector_lr),
        theta_prime_optimizer=torch.optim.Adam(
            adapter_parameters(model, bilevel.THETA_PRIME), lr=args.lr
        ) if two_adapters else None,
        sync_gradients=sync or (lambda params: None),
        safety_step_size=args.safety_step_size,
    )


def learn_selector(args, examples: list[Example], safe: list[Example], out: Path,
                   every_safe: list | None = None):
    """Returns (logits, weights, skipped, summary extras), one score per input row.
    `every_safe`: the upper-level data before --safe-sample, whose requests the nearness
    reads (default: `safe`)."""
    torch.manual_seed(args.seed)
    accelerator = make_accelerator(out)
    require_data_parallel(accelerator)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.chat_template,
                                                args.trust_remote_code)
    tokenized, safe_tok = tokenize_inputs(args, tokenizer, examples, safe)
    fit = fit_subset(tokenized, args.fit_sample, args.seed)
    adapters = selector_adapters(args.algorithm)
    model = add_lora_adapters(model, lora_settings(args), adapters,
                              args.gradient_checkpointing).to(accelerator.device)
    parts = bilevel_parts(model, len(fit), args, gradient_sync(accelerator))
    selector = parts.selector
    step_rule = bilevel.ALGORITHMS[args.algorithm]
    pad = tokenizer.pad_token_id
    device = accelerator.device

    def to_batch(data, positions: list[int]):
        if isinstance(data, tuple):  # preference pairs
            return {"chosen": to_batch(data[0], positions),
                    "rejected": to_batch(data[1], positions)}
        return collate(data, positions, pad, device)

    def step(ft_micro, safe_micro, progress, batch, safe_total):
        gamma = bilevel.gamma_at(args.gamma_schedule, args.gamma_start, args.gamma_increment,
                                 int(progress), progress)
        return step_rule(parts, [to_batch(fit, m) for m in ft_micro],
                         [to_batch(safe_tok, m) for m in safe_micro], gamma, len(batch),
                         safe_total, visited=torch.tensor(batch))

    fit_ids = ids_at(examples, fit.rows)
    settings = LoopSettings(
        epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        safe_batch_size=args.safe_batch_size, seed=args.seed, save_every=args.save_every,
        rank=accelerator.process_index, world=accelerator.num_processes,
        show_progress=args.show_progress,
    )
    model.train()
    state = train_loop(
        len(fit), len(safe_tok[0] if isinstance(safe_tok, tuple) else safe_tok),
        settings, step, out / "metrics.jsonl",
        adapter_checkpoint(out, model, {a: a for a in adapters}, {
            "theta": parts.theta_optimizer, "theta_prime": parts.theta_prime_optimizer,
            "selector": parts.selector_optimizer}, {"logits": selector.logits}), args.resume,
        describe=lambda positions: ", ".join(fit_ids[p] for p in positions[:8]),
        log=partial(log_metrics, accelerator),
    )
    finish_logging(accelerator)
    harm, score_seconds = None, 0.0
    if args.scoring == "final-pass":
        model.eval()
        scorer = Scorer(model, tokenizer, args)
        scoring_started = time.perf_counter()
        if args.neighbour_weight:
            # All of the safe set's requests, whatever --safe-sample: --safe-sample bounds the
            # bilevel fit's cost, and the encoder reads thousands of requests in seconds.
            scorer.neighbours = SafeNeighbours.fit(
                every_safe or safe, SentenceEncoder(args.neighbour_encoder), args.neighbour_k)
        if args.score_signal == "safe-gradient":
            safe_rows = len(safe_tok[0] if isinstance(safe_tok, tuple) else safe_tok)
            size = args.micro_batch_size
            scorer.fit_direction([to_batch(safe_tok, list(range(i, min(i + size, safe_rows))))
                                  for i in range(0, safe_rows, size)])
        harm = scorer.score_tokenized(tokenized, [examples[r] for r in tokenized.rows],
                                      accelerator)
        score_seconds = time.perf_counter() - scoring_started
        if fit is not tokenized:  # a selector over every row, not only the fitted ones
            selector = Selector(len(tokenized), args.weighting)
        with torch.no_grad():
            selector.logits.copy_(-(harm - harm.mean()) / spread(harm))
        if accelerator.is_main_process:
            count = keep_count_for(len(harm), args.keep_ratio, args.keep_count)
            scorer.save(out / SCORER_DIR, harm, float(harm.sort().values[count - 1]))
    learned = selector.logits.detach().cpu().numpy()
    learned_weights = selector.weights().detach().cpu().numpy()
    if accelerator.is_main_process:
        selector.save(out / "selector.safetensors", ids_at(examples, tokenized.rows))
    logits, weights = _per_row(len(examples), tokenized.rows, learned, learned_weights)
    harm_per_row = None
    if harm is not None:
        harm_per_row = np.full(len(examples), np.nan)
        harm_per_row[tokenized.rows] = harm.numpy()
    extra = {"algorithm": args.algorithm, "scoring": args.scoring, "steps": state.global_step,
             "train_seconds": round(state.elapsed, 2), "truncated": len(tokenized.truncated),
             "score_seconds": round(score_seconds, 2),
             "processes": accelerator.num_processes, "fitted_rows": len(fit),
             "harm_scores": harm_per_row}
    return logits, weights, tokenized.skipped, extra


def _answered(examples: list[Example], text: str) -> list[Example]:
    """The examples' prompts answered by `text`."""
    return [{**e, "messages": e["messages"][:-1] + [{"role": "assistant", "content": text}]}
            for e in examples]


def _layout_sample(examples: list[Example]) -> list[int]:
    """Positions of the first and the last example of every role layout (the roles of the
    messages before the answer)."""
    first: dict[tuple, int] = {}
    last: dict[tuple, int] = {}
    for p, e in enumerate(examples):
        layout = tuple(m["role"] for m in e["messages"][:-1])
        first.setdefault(layout, p)
        last[layout] = p
    return sorted(set(first.values()) | set(last.values()))


class Scorer:
    """The scoring pass: the final θ (adapter `theta` on the frozen base) and the signal
    settings of the run. Scores the fitted rows after training and, loaded from a run dir,
    rows the run never saw (`sealft score`)."""

    def __init__(self, model, tokenizer, args, refusal_floor: float | None = None,
                 direction: list[torch.Tensor] | None = None,
                 neighbours: SafeNeighbours | None = None,
                 standard: neighbours.Standard | None = None):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        # --neighbour-weight: the safe set's requests, and the mean and spread of the signal
        # and of the nearness over the fitted rows (set by the fit's pass, reused as saved) so
        # that rows scored later sit on the same scale.
        self.neighbours, self.standard = neighbours, standard
        # The score given to rows whose answer is a refusal: set by the fit's pass (below its
        # lowest other row), reused as saved for rows scored later.
        self.refusal_floor = refusal_floor
        # safe-gradient: ∇f(θ) of the fit's safe set, kept so that rows scored later are
        # measured against the same direction.
        self.direction = direction

    def fit_direction(self, safe_batches: list) -> None:
        """safe-gradient: ∇f(θ) over the safe set, from its micro-batches. Every process
        computes it over all safe rows (a few short forwards and backwards), so no process
        waits on another."""
        self.direction = bilevel.safe_direction(
            self.model, adapter_parameters(self.model, bilevel.THETA), safe_batches,
            self.args.score_tokens)

    def refusal_data(self, examples: list[Example], tokenized: Tokenized) -> list[Tokenized]:
        """Each usable row's own prompt answered by each of `args.refusals`, aligned with
        `tokenized` (position p is the same row in all). Only refusal-margin needs them."""
        args = self.args
        if args.score_signal != "refusal-margin":
            return []
        out = []
        for text in args.refusals:
            refusal = tokenize_examples(_answered(examples, text), self.tokenizer,
                                        args.max_length, args.num_proc, cache=False,
                                        desc="tokenising refusals")
            if len(refusal) != len(tokenized):
                raise ConfigError(f"--refusals {text!r}: cannot follow every prompt within "
                                  f"--max-length {args.max_length}; raise --max-length")
            out.append(refusal)
        return out

    def refusal_replies(self, examples: list[Example],
                        tokenized: Tokenized) -> list[list[int]] | None:
        """Each refusal's reply as token ids, to follow every row's own prompt tokens
        (`splice_reply`), or None. Tokenising every row's refusal conversations costs two
        template renderings per row and refusal, around a forward pass that on a GPU is short;
        yet with most chat templates a reply renders the same after any prompt. That is
        checked on the first and the last row of every role layout (system prompt or not,
        number of turns): each, answered by the refusal, must tokenise to its own prompt tokens
        and then one and the same reply. Where a check fails, None: every row's conversations
        are tokenised (`refusal_data`)."""
        args = self.args
        check = _layout_sample(examples)
        answered = [row for text in args.refusals
                    for row in _answered([examples[p] for p in check], text)]
        # No cut: the whole reply, whatever the length of the prompt it follows.
        probe = tokenize_examples(answered, self.tokenizer, 2**31 - 1, cache=False,
                                  desc="checking refusal replies")
        if len(probe) != len(answered):
            return None
        own_ids, own_labels = tokenized.take(check)
        probe_ids, probe_labels = probe.take(list(range(len(answered))))
        replies = []
        for t in range(len(args.refusals)):
            seen = set()
            for j in range(len(check)):
                ids, labels = probe_ids[t * len(check) + j], probe_labels[t * len(check) + j]
                start = int((labels == IGNORE_INDEX).sum())
                if (start != int((own_labels[j] == IGNORE_INDEX).sum())
                        or not np.array_equal(ids[:start], own_ids[j][:start])):
                    return None
                seen.add(tuple(ids[start:].tolist()))
            if len(seen) != 1:
                return None
            replies.append(list(seen.pop()))
        return replies

    def score_tokenized(self, tokenized: Tokenized, usable: list[Example], accelerator=None,
                        micro_batch_size: int | None = None,
                        show_progress: bool | None = None) -> torch.Tensor:
        """Harm score of every row of `tokenized` (`usable`: its examples, in order). Each
        process scores its shard; a sum over processes (each row scored once) gives every
        rank all scores. `micro_batch_size` / `show_progress` default to the run's."""
        from tqdm.auto import tqdm

        args = self.args
        if not len(tokenized):
            return torch.zeros(0)
        size = micro_batch_size or args.micro_batch_size
        show = args.show_progress if show_progress is None else show_progress
        rank = accelerator.process_index if accelerator else 0
        world = accelerator.num_processes if accelerator else 1
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        margin = args.score_signal == "refusal-margin"
        replies = self.refusal_replies(usable, tokenized) if margin else None
        refusals = self.refusal_data(usable, tokenized) if replies is None else []

        def refusal_batches(batch, positions: list[int]) -> list:
            if replies is not None:
                return [splice_reply(batch, r, pad, args.max_length) for r in replies]
            return [collate(r, positions, pad, device) for r in refusals]

        mine = list(range(len(tokenized)))[rank::world]
        scores = torch.zeros(len(tokenized), device=device)
        bar = tqdm(total=len(mine), desc="scoring rows", unit="row",
                   disable=not (show and rank == 0))
        gradient_signal = args.score_signal == "safe-gradient"
        params = adapter_parameters(self.model, bilevel.THETA) if gradient_signal else []
        for start in range(0, len(mine), size):
            micro = mine[start:start + size]
            batch = collate(tokenized, micro, pad, device)
            if gradient_signal:
                scores[micro] = bilevel.safe_gradient_scores(
                    self.model, params, self.direction, batch, args.score_tokens).float()
            else:
                scores[micro] = bilevel.final_scores(
                    self.model, batch, refusal_batches(batch, micro), args.score_signal,
                    args.score_tokens).float()
            bar.update(len(micro))
        bar.close()
        if world > 1:
            scores = accelerator.reduce(scores, reduction="sum")
        return self.keep_refusals(self.add_nearness(scores.cpu(), usable), usable)

    def add_nearness(self, scores: torch.Tensor, usable: list[Example]) -> torch.Tensor:
        """The signal mixed with the rows' nearness to the safe set's requests
        (`neighbours.mix`, w = --neighbour-weight); every process computes the nearness of all
        rows (a small encoder), so none waits on another."""
        weight = self.args.neighbour_weight
        if not weight:
            return scores
        near = self.neighbours.score(usable).to(scores.dtype)
        mixed, self.standard = neighbours.mix(scores, near, weight, self.standard)
        return mixed

    def keep_refusals(self, scores: torch.Tensor, usable: list[Example]) -> torch.Tensor:
        """Rows whose own answer refuses get the floor score. The signals read the prompt and
        the answer's first token, so a refusal worded unlike `--refusals` to a dangerous
        prompt would otherwise look like compliance."""
        if not self.args.keep_refusals:
            return scores
        refuses = torch.tensor([is_refusal(e["messages"][-1]["content"]) for e in usable],
                               dtype=torch.bool)
        if self.refusal_floor is None:
            rest = scores[~refuses]
            self.refusal_floor = float(rest.min() - spread(rest)) if len(rest) else 0.0
        return torch.where(refuses, torch.tensor(self.refusal_floor), scores)

    def save(self, directory: Path, fitted: torch.Tensor, kept_threshold: float) -> None:
        """θ as a PEFT adapter plus the settings and the fit's score scale, in `directory`."""
        from sealft.io import record_output, write_json

        record_output(directory)  # listed in the run's manifest before anything is written
        self.model.save_pretrained(directory, selected_adapters=[bilevel.THETA],
                                   safe_serialization=True)
        if self.direction is not None:
            from safetensors.torch import save_file

            tmp = directory / (DIRECTION_FILE + ".tmp")
            save_file({name: d.detach().cpu().contiguous() for name, d in
                       zip(_theta_names(self.model), self.direction, strict=True)}, str(tmp))
            tmp.replace(directory / DIRECTION_FILE)
        if self.neighbours is not None:
            self.neighbours.save(directory / NEIGHBOURS_FILE)
        args = self.args
        write_json(directory / SCORING_FILE, {
            "signal": args.score_signal, "tokens": args.score_tokens,
            "refusals": list(args.refusals), "mean": float(fitted.mean()),
            "spread": float(spread(fitted)), "threshold": kept_threshold,
            "keep_refusals": args.keep_refusals, "refusal_floor": self.refusal_floor,
            "neighbour_weight": args.neighbour_weight, "standard": self.standard})


def load_scorer(run: Path, fitted, saved: dict, dtype: str | None = None,
                device=None) -> Scorer:
    """The scorer a `final-pass` run saved in `run/scorer/` (`fitted`: the run's SelectArgs,
    `saved`: its scoring.json, both as `score.fitted_select_args` read them), on its base
    model, on `device` (default: CUDA when there is one)."""
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(fitted.model, dtype or fitted.dtype,
                                                fitted.chat_template, fitted.trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(model, str(run / SCORER_DIR / bilevel.THETA),
                                      adapter_name=bilevel.THETA).to(device)
    model.eval()
    # A run saved before refusal rows were kept scored them like any other row.
    fitted = dataclasses.replace(fitted, keep_refusals=saved.get("keep_refusals", False),
                                 neighbour_weight=saved.get("neighbour_weight", 0.0))
    direction = None
    if fitted.score_signal == "safe-gradient":
        from safetensors.torch import load_file

        tensors = load_file(str(run / SCORER_DIR / DIRECTION_FILE), device=str(device))
        names = _theta_names(model)
        if sorted(names) != sorted(tensors):
            raise ConfigError(f"--selection {run}: {SCORER_DIR}/{DIRECTION_FILE} does not "
                              f"match the saved adapter; rerun the selection")
        direction = [tensors[n] for n in names]
    neighbours = None
    if fitted.neighbour_weight:
        neighbours = SafeNeighbours.load(run / SCORER_DIR / NEIGHBOURS_FILE,
                                         SentenceEncoder(fitted.neighbour_encoder),
                                         fitted.neighbour_k)
    return Scorer(model, tokenizer, fitted, saved.get("refusal_floor"), direction, neighbours,
                  saved.get("standard"))


def _theta_names(model) -> list[str]:
    """Names of θ's LoRA parameters, in `adapter_parameters` order."""
    marker = f".{bilevel.THETA}."
    return [n for n, _ in model.named_parameters() if "lora_" in n and marker in n]


def score_examples(scorer: Scorer, examples: list[Example], micro_batch_size: int | None = None,
                   show_progress: bool = True,
                   accelerator=None) -> tuple[np.ndarray, dict[str, str]]:
    """Harm score per example (NaN where unusable) and the unusable ones' reasons. With an
    `accelerator` of several processes each scores a shard and every rank gets all scores."""
    args = scorer.args
    tokenized = tokenize_examples(examples, scorer.tokenizer, args.max_length, args.num_proc,
                                  desc="tokenising rows to score")
    scores = np.full(len(examples), np.nan)
    if len(tokenized):
        scores[tokenized.rows] = scorer.score_tokenized(
            tokenized, [examples[r] for r in tokenized.rows], accelerator, micro_batch_size,
            show_progress).numpy()
    return scores, tokenized.skipped


def _per_row(n: int, rows: list[int], logits: np.ndarray, weights: np.ndarray):
    full_logits, full_weights = np.full(n, np.nan), np.full(n, np.nan)
    full_logits[rows], full_weights[rows] = logits, weights
    return full_logits, full_weights
