"""The one per-example loss every stage uses (selection, fine-tuning, reference scores).

Only supervised positions go through the vocabulary projection: for chat data most tokens are
prompt, and for small models the [tokens × vocab] logits dominate both time and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from sealft.tokenize import IGNORE_INDEX


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_ENGINE_WRAPPERS = (DistributedDataParallel, FullyShardedDataParallel, FSDPModule)


def engine_wrapped(model) -> bool:
    """True for a model wrapped by DDP, FSDP (1 or 2) or DeepSpeed via accelerator.prepare."""
    return isinstance(model, _ENGINE_WRAPPERS) or type(model).__name__ == "DeepSpeedEngine"


def _supervised_logits(model, batch: dict[str, torch.Tensor], supervised: torch.Tensor):
    """Float logits at the supervised positions, [n_supervised, vocab]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if engine_wrapped(model):
        # DDP, FSDP and DeepSpeed sync gradients / gather shards only inside the wrapper's own
        # forward, so an engine-wrapped model takes the ordinary full forward (every position
        # projected, as in any HF trainer) instead of the cheaper decoder-then-head path.
        return model(input_ids=ids, attention_mask=mask).logits[:, :-1][supervised].float()
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    logits = lm.get_output_embeddings()(hidden[supervised]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def per_example_loss(
    model, batch: dict[str, torch.Tensor], first_tokens: int | None = None, mean: bool = True
) -> torch.Tensor:
    """Mean (or, with mean=False, summed) next-token NLL over each example's response tokens,
    shape [batch].

    `first_tokens` limits the loss to the first k response tokens of each example (where a
    model decides between refusing and complying).
    """
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE_INDEX
    if first_tokens is not None:
        supervised &= supervised.long().cumsum(dim=1) <= first_tokens
    logits = _supervised_logits(model, batch, supervised)
    sums = _row_sums(F.cross_entropy(logits, labels[supervised], reduction="none"), supervised)
    if not mean:
        return sums
    counts = supervised.sum(dim=1).clamp(min=1)
    return sums / counts


def per_example_nll_and_hits(model, batch: dict[str, torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, from one forward pass: the summed next-token NLL of its response tokens,
    and how many of those tokens are the model's top-1 prediction. Token-weighted, the hits
    give the teacher-forced token accuracy TRL logs as `mean_token_accuracy`, an accuracy for
    long-form answers that have no label to parse."""
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE_INDEX
    logits = _supervised_logits(model, batch, supervised)
    targets = labels[supervised]
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    hits = (logits.argmax(dim=-1) == targets).float()
    return _row_sums(token_nll, supervised), _row_sums(hits, supervised)


def _row_sums(per_token: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Per-token values (one per supervised position, row-major) summed per example."""
    row_of_token = supervised.nonzero(as_tuple=True)[0]
    return torch.zeros(supervised.shape[0], device=per_token.device).index_add(
        0, row_of_token, per_token)


def first_response_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities over the vocabulary for each row's first response token, [batch,
    vocab]: one row of logits per example, from the position before its response."""
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE_INDEX
    first = supervised & (supervised.long().cumsum(dim=1) <= 1)
    return torch.log_softmax(_supervised_logits(model, batch, first), dim=-1)


def sequence_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return per_example_loss(model, batch, mean=False)


def preference_loss(model, chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor],
                    reference_margin: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO loss of preferring `chosen` over `rejected`; `reference_margin` is the frozen
    reference model's NLL(rejected) − NLL(chosen) for the same pairs. Mean over pairs."""
    policy_margin = sequence_nll(model, rejected) - sequence_nll(model, chosen)
    return -F.logsigmoid(beta * (policy_margin - reference_margin)).mean()
