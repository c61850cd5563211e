"""Batched, resumable generation of responses to evaluation prompts.

Responses are appended to `generations.jsonl` after every batch, so an interrupted evaluation
loses at most one batch and a rerun only generates what is missing. Prompts are sorted by length
before batching because left-padded batches of similar length waste the least compute.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sealft.errors import DataError

GENERATIONS_FILE = "generations.jsonl"


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that changes what a model answers; recorded with the generations."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer; `key` identifies its cached response."""

    suite: str
    id: str
    prompt: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.suite, self.id)


def read_generations(path: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Cached generations by (suite, id). A torn last line (a kill mid-write) is ignored;
    a malformed line in the middle is corruption and an error naming the line."""
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):  # no trailing newline: the last write was cut short
                continue
            raise DataError(
                f"{path}:{line_no}: malformed generation line; delete that line (it will be "
                "regenerated) or rerun with --overwrite"
            ) from None
        cache[(str(row.get("suite")), str(row.get("id")))] = row
    return cache


def repair_torn_tail(path: str | Path) -> None:
    """Cut a partial last line so the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def missing_items(
    items: Iterable[PromptItem], cache: dict[tuple[str, str], dict[str, Any]]
) -> list[PromptItem]:
    """Items without a cached response for the same prompt text (an edited prompt reruns)."""
    return [it for it in items if cache.get(it.key, {}).get("prompt") != it.prompt]


def format_prompts(tokenizer, prompts: list[str], system_prompt: str | None) -> list[str]:
    """Wrap each prompt as a single user turn in the model's chat template."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        texts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return texts


def _stop_token_ids(model, tokenizer) -> list[int]:
    # Chat models end a turn with a token (<|im_end|>, <|eot_id|>) that is not always the
    # config's eos; stopping on every known end token avoids rambling into a fake next turn.
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    return sorted(set(ids))


def batch_seed(seed: int, ids: list[str]) -> int:
    """A per-batch seed from the run seed and the batch's ids, so a resumed sampling run draws
    the same numbers for the same prompts as an uninterrupted one would."""
    digest = hashlib.sha256(f"{seed}:{'|'.join(ids)}".encode()).hexdigest()
    return int(digest[:8], 16)


def generate_batch(model, tokenizer, texts: list[str], settings: GenerationSettings) -> list[str]:
    """Generate one left-padded batch; returns only the newly generated text."""
    import torch
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_token_ids(model, tokenizer),
    )
    with torch.inference_mode():
        output = model.generate(**encoded, generation_config=config)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    # One write + fsync per batch: a kill loses at most this batch, never earlier ones.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())


def generate_missing(
    model,
    tokenizer,
    items: list[PromptItem],
    path: str | Path,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Generate responses for items not yet in `path`; returns the full cache."""
    import torch
    from tqdm.auto import tqdm

    path = Path(path)
    repair_torn_tail(path)
    cache = read_generations(path)
    todo = sorted(missing_items(items, cache), key=lambda it: (len(it.prompt), it.key))
    bar = tqdm(total=len(todo), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        if settings.do_sample:
            torch.manual_seed(batch_seed(settings.seed, [it.id for it in batch]))
        texts = format_prompts(tokenizer, [it.prompt for it in batch], settings.system_prompt)
        responses = generate_batch(model, tokenizer, texts, settings)
        rows = [
            {"suite": it.suite, "id": it.id, "prompt": it.prompt, "response": resp}
            for it, resp in zip(batch, responses, strict=True)
        ]
        _append_rows(path, rows)
        cache.update({(r["suite"], r["id"]): r for r in rows})
        bar.update(len(batch))
    bar.close()
    return cache
