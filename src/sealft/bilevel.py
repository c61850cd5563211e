"""The SEAL update: one optimisation step of the data selector's bilevel problem.

    min_ω  f(θ*(ω))   s.t.  θ*(ω) = argmin_θ g(θ, ω),   g(θ, ω) = mean_i σ_i(ω) ℓ_i(θ)

f is the loss on a safe batch (harmful prompts → refusals), ℓ_i the loss of fine-tuning
example i, σ(ω) the selector's weights. SEAL solves it with a first-order penalty method:

    min_{θ, ω}  f(θ) + γ (g(θ, ω) − g(θ', ω)),   θ' ≈ argmin g(·, ω)

Algorithm 1 (`penalty_step`), per step:
    θ' ← θ' − η ∇θ' g(θ', ω)                      θ' tracks the lower-level optimum
    θ  ← θ  − η ∇θ [f(θ) + γ g(θ, ω)]             θ fits the data under the safety objective
    ω  ← ω  − η_ω ∇ω γ [g(θ, ω) − g(θ', ω)]       examples θ fits worse than θ' lose weight
Algorithm 2 (`memory_efficient_step`) drops θ': ω ← ω − η_ω ∇ω γ g(θ, ω) — sealft's default,
the only one that measurably ranks harmful rows below benign long answers (docs/selection.md).
`safety_step` is Algorithm 1 with θ warm-started at θ' each step and moved by one normalised
step on f (the earlier default; on the SST-2 mixes it mostly reads answer length).

After the loop, `final_scores` ranks every row once under the final θ (the scoring pass,
sealft's default `--scoring final-pass`) instead of by the logits its visits left;
`safe_gradient_scores` ranks it by the hypergradient itself, −⟨∇ℓ_i(θ), ∇f(θ)⟩.

θ and θ' are two LoRA adapters on one frozen base. Each forward pass is used once: the
per-example losses ℓ_i(θ) feed both θ's and ω's gradients, ℓ_i(θ') both θ''s and ω's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sealft.losses import (
    first_response_log_probs,
    per_example_loss,
    preference_loss,
    sequence_nll,
)
from sealft.selector import Selector
from sealft.tokenize import IGNORE_INDEX, response_start

THETA, THETA_PRIME = "theta", "theta_prime"
Batch = dict[str, torch.Tensor]


class VisitedRMSUpdate:
    """The selector's optimiser: step only the logits of the examples in the batch, along the
    local gradient (softmax normaliser held fixed), scaled by one running RMS shared by all.

    Why not Adam on the full gradient (the reference implementation)? Through the global
    softmax every logit gets a tiny gradient at every step, and Adam rescales each coordinate
    to a step of about lr: unvisited logits all drift together, and the normaliser's term
    shifts a whole batch by an amount that depends on its batch-mates. The final ranking then
    reflects *when* and *with whom* an example was visited. The local gradient σ_i·signal_i
    depends on example i alone; one shared scale (instead of Adam's
    per-coordinate one) keeps relative gradient sizes, which are the ranking signal, while
    `lr` keeps meaning "typical change of a logit per visit". Softmax is shift-invariant, so
    dropping the common-mode term changes no ranking.
    """

    local_gradient = True

    def __init__(self, selector: Selector, lr: float, eps: float = 1e-12):
        self.selector, self.lr, self.eps = selector, lr, eps
        # A cumulative (not exponential) mean of squared gradients: after a few batches it is
        # nearly constant, so early and late visits are scaled alike.
        self.sum_square = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def step(self, visited: torch.Tensor) -> None:
        grad = self.selector.logits.grad
        if grad is None:
            return
        local = grad[visited]
        if local.pow(2).sum() <= self.eps:  # γ = 0: nothing to learn yet
            return
        self.sum_square += local.double().pow(2).sum().cpu()
        self.count += len(local)
        rms = (self.sum_square / self.count).sqrt().to(local.dtype)
        self.selector.logits[visited] -= self.lr * local / (rms + self.eps)

    def zero_grad(self) -> None:
        self.selector.logits.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum_square": self.sum_square.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sum_square.copy_(state["sum_square"])
        self.count.copy_(state["count"])


class DenseAdamUpdate:
    """The paper's selector optimiser: Adam on the full (dense) gradient of all logits."""

    local_gradient = False

    def __init__(self, selector: Selector, lr: float):
        self.selector = selector
        self.adam = torch.optim.Adam(selector.parameters(), lr=lr)

    def step(self, visited: torch.Tensor) -> None:
        if self.selector.logits.grad is not None:
            self.adam.step()

    def zero_grad(self) -> None:
        self.adam.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.adam.state_dict()

    def load_state_dict(self, state) -> None:
        self.adam.load_state_dict(state)


SELECTOR_OPTIMIZERS = {"visited-rms": VisitedRMSUpdate, "adam": DenseAdamUpdate}


@dataclass
class BilevelParts:
    """Everything a step touches; built once by the selection stage."""

    model: torch.nn.Module
    """PEFT model with adapters `theta` (and `theta_prime` for Algorithm 1) on one frozen base."""
    selector: Selector
    theta_optimizer: torch.optim.Optimizer
    selector_optimizer: VisitedRMSUpdate | DenseAdamUpdate
    theta_prime_optimizer: torch.optim.Optimizer | None = None
    sync_gradients: Callable[[list[torch.nn.Parameter]], None] = lambda params: None
    """All-reduces gradients across processes (identity on one process)."""
    safety_step_size: float = 1.0
    """safety-step algorithm: length of θ's normalised step from θ' on the safety objective."""
    reference_margins: dict[int, float] = field(default_factory=dict)
    """Cache of the frozen model's DPO margins, by safe-pair position."""


def _rows(batch: Batch) -> torch.Tensor:
    return batch["positions"]


def _selector_weights(parts: BilevelParts, batch: Batch) -> torch.Tensor:
    return parts.selector.weights(_rows(batch), local=parts.selector_optimizer.local_gradient)


def _reference_margin(parts: BilevelParts, batch: Batch) -> torch.Tensor:
    """The frozen base model's NLL(rejected) − NLL(chosen) per pair. It never changes, so each
    pair's value is computed once and kept (saves a third of the DPO cost)."""
    positions = batch["chosen"]["positions"].tolist()
    missing = [k for k, p in enumerate(positions) if p not in parts.reference_margins]
    if missing:
        with torch.no_grad(), parts.model.disable_adapter():
            margins = sequence_nll(parts.model, batch["rejected"]) - sequence_nll(
                parts.model, batch["chosen"])
        for k in missing:
            parts.reference_margins[positions[k]] = margins[k].item()
    device = batch["chosen"]["input_ids"].device
    return torch.tensor([parts.reference_margins[p] for p in positions], device=device)


def _safety_backward(parts: BilevelParts, safe_batches: list[Batch], safe_total: int) -> float:
    """Backward of f(θ): the mean safe-set loss, or the DPO loss when the safe batches are
    preference pairs (`chosen` / `rejected` sub-batches). Returns f's value."""
    total = 0.0
    for batch in safe_batches:
        if "chosen" in batch:
            size = len(batch["chosen"]["input_ids"])
            loss = preference_loss(parts.model, batch["chosen"], batch["rejected"],
                                   _reference_margin(parts, batch)) * size
        else:
            loss = per_example_loss(parts.model, batch).sum()
        (loss / safe_total).backward()
        total += loss.item()
    return total / safe_total


def _lower_level_backward(
    parts: BilevelParts, ft_batches: list[Batch], ft_total: int
) -> tuple[list[torch.Tensor], float]:
    """Backward of g(θ', ω) for θ' (weights held fixed); returns ℓ(θ') per batch and g."""
    parts.model.set_adapter(THETA_PRIME)
    losses_prime, g_prime = [], 0.0
    for batch in ft_batches:
        weights = parts.selector.weights(_rows(batch)).detach()
        losses = per_example_loss(parts.model, batch)
        (weights * losses).sum().div(ft_total).backward()
        losses_prime.append(losses.detach())
        g_prime += (weights * losses.detach()).sum().item() / ft_total
    return losses_prime, g_prime


def _step_and_clear(optimizer: torch.optim.Optimizer, parts: BilevelParts) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    parts.sync_gradients(params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step_selector(parts: BilevelParts, ft_batches: list[Batch],
                   visited: torch.Tensor | None) -> None:
    """`visited`: rows of the whole batch over all processes (default: this process's rows);
    every rank must update the same logits to keep identical selectors."""
    parts.sync_gradients([parts.selector.logits])
    if visited is None:
        visited = torch.cat([_rows(b) for b in ft_batches])
    parts.selector_optimizer.step(visited.to(parts.selector.logits.device))
    parts.selector_optimizer.zero_grad()


def penalty_step(
    parts: BilevelParts, ft_batches: list[Batch], safe_batches: list[Batch],
    gamma: float, ft_total: int, safe_total: int, visited: torch.Tensor | None = None,
) -> dict[str, float]:
    """Algorithm 1. `*_total` are the effective (all-process) batch sizes the means divide by."""
    model = parts.model
    losses_prime, g_prime = _lower_level_backward(parts, ft_batches, ft_total)
    _step_and_clear(parts.theta_prime_optimizer, parts)

    model.set_adapter(THETA)
    f_value = _safety_backward(parts, safe_batches, safe_total)
    g_value = 0.0
    for batch, loss_prime in zip(ft_batches, losses_prime, strict=True):
        weights = _selector_weights(parts, batch)
        losses = per_example_loss(model, batch)
        # One backward gives θ the gradient of γ·g(θ, ω) and ω the gradient of
        # γ·(g(θ, ω) − g(θ', ω)): ℓ(θ') is a constant here, so it only reaches ω.
        (gamma * (weights * (losses - loss_prime)).sum() / ft_total).backward()
        g_value += (weights.detach() * losses.detach()).sum().item() / ft_total
    _step_and_clear(parts.theta_optimizer, parts)
    _step_selector(parts, ft_batches, visited)
    return {"f_safe": f_value, "g_theta": g_value, "g_theta_prime": g_prime,
            "penalty": g_value - g_prime, "gamma": gamma}


def memory_efficient_step(
    parts: BilevelParts, ft_batches: list[Batch], safe_batches: list[Batch],
    gamma: float, ft_total: int, safe_total: int, visited: torch.Tensor | None = None,
) -> dict[str, float]:
    """Algorithm 2: no θ'; θ on f + γ·g(θ, ω) and ω on γ·g(θ, ω), from one backward."""
    model = parts.model
    model.set_adapter(THETA)
    f_value = _safety_backward(parts, safe_batches, safe_total)
    g_value = 0.0
    for batch in ft_batches:
        weights = _selector_weights(parts, batch)
        losses = per_example_loss(model, batch)
        (gamma * (weights * losses).sum() / ft_total).backward()
        g_value += (weights.detach() * losses.detach()).sum().item() / ft_total
    _step_and_clear(parts.theta_optimizer, parts)
    _step_selector(parts, ft_batches, visited)
    return {"f_safe": f_value, "g_theta": g_value, "gamma": gamma}


def safety_step(
    parts: BilevelParts, ft_batches: list[Batch], safe_batches: list[Batch],
    gamma: float, ft_total: int, safe_total: int, visited: torch.Tensor | None = None,
) -> dict[str, float]:
    """Algorithm 1 with θ warm-started at θ' every step: θ = θ' − η_f ∇f(θ')/‖∇f(θ')‖.

    The penalty signal ℓ_i(θ) − ℓ_i(θ') then measures, to first order, −η_f ∇f·∇ℓ_i: how much
    a step toward safety raises example i's loss, i.e. how much fitting i conflicts with the
    safety objective (the one-step hypergradient of the bilevel problem). A persistent θ
    instead accumulates every difference between the safe set and the task (format, length,
    topic), which swamps the per-example conflict; see docs/selection.md for the measurements.
    """
    model = parts.model
    losses_prime, g_prime = _lower_level_backward(parts, ft_batches, ft_total)

    theta = [p for group in parts.theta_optimizer.param_groups for p in group["params"]]
    theta_prime = [p for g in parts.theta_prime_optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        for target, source in zip(theta, theta_prime, strict=True):
            target.copy_(source)
    model.set_adapter(THETA)
    f_value = _safety_backward(parts, safe_batches, safe_total)
    parts.sync_gradients(theta)
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in theta if p.grad is not None))
        for p in theta:
            if p.grad is not None:
                p -= parts.safety_step_size * p.grad / (norm + 1e-12)
                p.grad = None
        losses_theta = [per_example_loss(model, batch) for batch in ft_batches]
    g_value = 0.0
    for batch, loss, loss_prime in zip(ft_batches, losses_theta, losses_prime, strict=True):
        weights = _selector_weights(parts, batch)
        (gamma * (weights * (loss - loss_prime)).sum() / ft_total).backward()
        g_value += (weights.detach() * loss).sum().item() / ft_total
    _step_selector(parts, ft_batches, visited)
    _step_and_clear(parts.theta_prime_optimizer, parts)
    return {"f_safe": f_value, "g_theta": g_value, "g_theta_prime": g_prime,
            "penalty": g_value - g_prime, "gamma": gamma}


ALGORITHMS = {"penalty": penalty_step, "memory-efficient": memory_efficient_step,
              "safety-step": safety_step}


def _through_first_tokens(batch: Batch, k: int) -> Batch:
    """The batch cut after every row's k-th response token: a causal model's logits up to
    there do not depend on what follows, so the cut changes no score and saves the forward
    pass over long answers."""
    supervised = batch["labels"] != IGNORE_INDEX
    needed = supervised & (supervised.long().cumsum(dim=1) <= k)
    columns = needed.any(dim=0).nonzero()
    end = int(columns.max()) + 1 if len(columns) else batch["labels"].shape[1]
    return {key: value[:, :end] if value.dim() == 2 else value for key, value in batch.items()}


def _same_prompts(batch: Batch, refusal_batches: list[Batch]) -> bool:
    """Whether every refusal row carries its row's own prompt tokens: then the row's first
    answer token and every refusal's first token are predicted from one and the same position,
    and one forward pass over the prompt scores them all. (A template that rewrites earlier
    turns once a reply follows can break this; those batches take one forward per text.)"""
    start = response_start(batch)
    width = int(start.max())
    in_prompt = torch.arange(width, device=start.device)[None, :] < start[:, None]
    prompt = batch["input_ids"][:, :width][in_prompt]
    return all(torch.equal(response_start(r), start)
               and torch.equal(r["input_ids"][:, :width][in_prompt], prompt)
               for r in refusal_batches)


def _first_token_margin(model: torch.nn.Module, batch: Batch,
                        refusal_batches: list[Batch]) -> torch.Tensor:
    """refusal-margin over one response token from a single forward pass (see final_scores)."""
    log_probs = first_response_log_probs(model, _through_first_tokens(batch, 1))
    rows = torch.arange(len(log_probs), device=log_probs.device)
    start = response_start(batch)

    def nll(b: Batch) -> torch.Tensor:
        return -log_probs[rows, b["labels"][rows, start]]

    return nll(batch) - torch.stack([nll(r) for r in refusal_batches]).min(dim=0).values


@torch.no_grad()
def final_scores(model: torch.nn.Module, batch: Batch, refusal_batches: list[Batch],
                 signal: str, first_tokens: int | None) -> torch.Tensor:
    """Each row's harm score (higher = more harmful) under the final θ, for the scoring pass.

    Every row is scored by one θ after training, instead of by the θ of the step that happened
    to visit it (rows visited early and late would be ranked by different models). Signals:
      loss            ℓ_i(θ) over the first response tokens: Algorithm 2's ω signal, evaluated
                      once for all rows. Mixes harm with how hard the text is.
      loss-shift      ℓ_i(θ) − ℓ_i(θ₀): how much the safety pull (θ against the frozen base θ₀)
                      raised the row's loss; text difficulty cancels.
      refusal-margin  ℓ_i(θ) − min_r ℓ(r | prompt_i; θ): how strongly θ prefers answering the
                      row's own prompt with a refusal r over the row's answer. It asks the
                      upper level's question (refuse harmful prompts) of each row's prompt; an
                      answer that is itself a refusal scores low, so refusals are kept.
    `first_tokens` limits both losses to the first k response tokens, where an aligned model
    decides between refusing and complying (Qi et al. 2024). With k = 1 the margin is the log
    odds of opening with a refusal rather than with the row's own first token; longer windows
    bring back the text-difficulty confound (docs/selection.md).

    With k = 1 the row's answer and its refusals share their prompt, so one forward pass gives
    all their first-token losses (`_first_token_margin`); k > 1 takes one forward per text.
    """
    model.set_adapter(THETA)
    if (signal == "refusal-margin" and first_tokens == 1
            and _same_prompts(batch, refusal_batches)):
        return _first_token_margin(model, batch, refusal_batches)
    if first_tokens is not None:
        batch = _through_first_tokens(batch, first_tokens)
    loss = per_example_loss(model, batch, first_tokens)
    if signal == "loss":
        return loss
    if signal == "loss-shift":
        with model.disable_adapter():
            return loss - per_example_loss(model, batch, first_tokens)
    if first_tokens is not None:
        refusal_batches = [_through_first_tokens(r, first_tokens) for r in refusal_batches]
    refusal = torch.stack([per_example_loss(model, r, first_tokens)
                           for r in refusal_batches]).min(dim=0).values
    return loss - refusal


def safe_direction(model: torch.nn.Module, params: list[torch.nn.Parameter],
                   safe_batches: list[Batch], first_tokens: int | None) -> list[torch.Tensor]:
    """∇f(θ): the gradient of the safe set's mean loss (over its first k response tokens)
    with respect to θ's LoRA parameters `params`, for the `safe-gradient` signal. Preference
    pairs contribute their chosen side: what the upper level wants the model to say."""
    model.set_adapter(THETA)
    batches = [b.get("chosen", b) for b in safe_batches]
    total = sum(len(b["input_ids"]) for b in batches)
    direction = [torch.zeros_like(p) for p in params]
    for batch in batches:
        if first_tokens is not None:
            batch = _through_first_tokens(batch, first_tokens)
        loss = per_example_loss(model, batch, first_tokens).sum() / total
        for acc, grad in zip(direction, torch.autograd.grad(loss, params), strict=True):
            acc += grad
    return direction


# How far the safe-gradient signal steps θ along ∇f: far enough that the safe set's own loss
# moves by this many nats to first order (ε‖∇f‖² = SAFE_STEP), so the loss differences stand
# well above float32 noise; near enough that curvature does not matter for a ranking.
SAFE_STEP = 1e-2


@torch.no_grad()
def safe_gradient_scores(model: torch.nn.Module, params: list[torch.nn.Parameter],
                         direction: list[torch.Tensor], batch: Batch,
                         first_tokens: int | None) -> torch.Tensor:
    """−⟨∇ℓ_i(θ), ∇f(θ)⟩ per row: SEAL's hypergradient for row i's weight to first order
    (training on row i moves the safe loss f by −η⟨∇f, ∇ℓ_i⟩), at one θ for every row. Rows
    that pull θ against the safe set's refusals score high.

    A central difference of the rows' losses along ∇f gives every row's inner product from
    two forward passes over the batch, where per-row gradients would need a backward per row
    (and a double backward, the exact batched form, is not implemented for every attention
    kernel)."""
    model.set_adapter(THETA)
    if first_tokens is not None:
        batch = _through_first_tokens(batch, first_tokens)
    norm = sum(float((d * d).sum()) for d in direction)
    eps = SAFE_STEP / max(norm, 1e-30)
    saved = [p.detach().clone() for p in params]

    def loss_at(sign: float) -> torch.Tensor:
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=sign * eps)
        try:
            return per_example_loss(model, batch, first_tokens)
        finally:
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)

    return (loss_at(-1.0) - loss_at(1.0)) / (2 * eps)


def gamma_at(schedule: str, start: float, increment: float, epoch: int, progress: float) -> float:
    """Penalty weight γ. `epoch`: +increment per finished epoch (the paper: 0, 0.03, 0.06);
    `linear`: grows continuously with `progress` in epochs; `constant`: start."""
    if schedule == "epoch":
        return start + increment * epoch
    if schedule == "linear":
        return start + increment * progress
    return start
