"""Chat-template tokenisation with response-only labels.

Each example is rendered twice with the model's own chat template: the prompt (all messages but
the last, plus the generation prompt) and the full conversation. The response is the text the
full rendering adds after the prompt; labels are -100 on the prompt, so the loss (and SEAL's
per-example signal) is about what the model *answers*, never about the question.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sealft.data import Example, Examples
from sealft.errors import DataError
from sealft.models import CACHE_DIR

IGNORE_INDEX = -100


class Tokenized:
    """Token ids and labels for the usable examples, plus an account of the unusable ones.

    The ids stay in the memory-mapped Arrow file `datasets.map` wrote (one row per input
    example); `input_ids[p]` / `labels[p]` read the p-th usable example's list from it, so a
    million examples cost disk, not Python lists."""

    def __init__(self, table, rows: np.ndarray, skipped: dict[str, str] | None = None,
                 truncated: list[str] | None = None):
        self.table = table
        """The Arrow table (pyarrow) with input_ids / labels, indexed by input row."""
        self.rows = np.asarray(rows, dtype=np.int64)
        """Position of each usable example in the input example list."""
        self.skipped = skipped or {}
        """id -> reason, for examples that cannot be trained on."""
        self.truncated = truncated or []
        """ids whose response was cut at max_length (still used)."""
        self.input_ids = _Column(table.column("input_ids"), self.rows)
        self.labels = _Column(table.column("labels"), self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        """Tokens per usable example, without reading the ids."""
        import pyarrow.compute as pc

        return pc.list_value_length(self.table.column("input_ids")).to_numpy()[self.rows]

    def take(self, positions: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Token ids and labels of the usable examples at `positions`, from one Arrow `take`
        (a batch costs one read, not two per row)."""
        import pyarrow as pa

        part = self.table.select(["input_ids", "labels"]).take(
            pa.array(self.rows[np.asarray(positions, dtype=np.int64)]))
        return _split_lists(part.column("input_ids")), _split_lists(part.column("labels"))

    def subset(self, rows) -> Tokenized:
        """The usable examples at input rows `rows` (each must be usable here)."""
        return Tokenized(self.table, rows)


def _split_lists(column) -> list[np.ndarray]:
    import pyarrow.compute as pc

    array = column.combine_chunks()
    # flatten() and the lengths honour a sliced array's offset, unlike .values / .offsets.
    ends = np.cumsum(pc.list_value_length(array).to_numpy(zero_copy_only=False))
    # One copy of the batch's values: Arrow's zero-copy view is read-only, which torch warns on.
    values = np.array(array.flatten().to_numpy(zero_copy_only=False))
    return np.split(values, ends[:-1])


class _Column:
    """One list-of-ints column, indexed by usable position; each read is one row's list."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, p: int) -> list[int]:
        return self.array[int(self.rows[p])].as_py()


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _render_all(tokenizer, conversations: list[list[dict[str, str]]],
                generation_prompt: bool) -> list[str | Exception]:
    """Each conversation rendered, or the template's error for it. One batched call first:
    transformers' per-call preparation costs as much as the rendering itself; a batch with a
    failing conversation is rendered again one by one to find which."""
    if not conversations:
        return []
    try:
        return list(_render(tokenizer, conversations, generation_prompt))
    except Exception:  # the template's own raise_exception, for some row of the batch
        out: list[str | Exception] = []
        for messages in conversations:
            try:
                out.append(_render(tokenizer, messages, generation_prompt))
            except Exception as err:
                out.append(err)
        return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens. A fast tokenizer's Rust backend is called directly
    (what `tokenizer(texts)` calls too, minus building offsets, masks and Python dicts per
    row, which took a third of the tokenising time)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # A padded call through transformers (generation does one) leaves padding, and possibly
    # truncation, switched on in the backend; encoding through it then would pad every row
    # to the batch's longest. Switched off for this call and restored after it.
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    try:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    finally:
        if padding:
            backend.enable_padding(**padding)
        if truncation:
            backend.enable_truncation(**truncation)


def _split_prompt(prompt_text: str, full_text: str) -> str:
    """The prompt part of the full rendering. Some templates rewrite earlier turns once a
    reply follows; then the response is whatever differs after the longest common prefix."""
    if full_text.startswith(prompt_text):
        return prompt_text
    common = 0
    while common < min(len(prompt_text), len(full_text)) and (
        prompt_text[common] == full_text[common]
    ):
        common += 1
    return full_text[:common]


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer, max_length: int) -> dict[str, list]:
    conversations = [json.loads(m) for m in batch["messages"]]
    with_prompt = [k for k, messages in enumerate(conversations) if len(messages) > 1]
    fulls = _render_all(tokenizer, conversations, False)
    prompt_of = dict(zip(with_prompt, _render_all(
        tokenizer, [conversations[k][:-1] for k in with_prompt], True), strict=True))
    prompts, responses, reasons = [], [], []
    for k, messages in enumerate(conversations):
        reason = ""
        if messages[-1]["role"] != "assistant":
            reason = "last message is not an assistant response"
        elif not messages[-1]["content"].strip():
            reason = "empty response"
        prompt_text, full_text = prompt_of.get(k, ""), fulls[k]
        error = next((r for r in (full_text, prompt_text) if isinstance(r, Exception)), None)
        if error is not None:
            # Skipped with the reason rather than aborting: the summary counts the reasons.
            prompt_text = full_text = ""
            reason = reason or f"chat template error: {' '.join(str(error).split())[:120]}"
        prompt_text = _split_prompt(prompt_text, full_text)
        prompts.append(prompt_text)
        responses.append(full_text[len(prompt_text):])
        reasons.append(reason)
    # One batched call into the Rust tokenizer per side: the slow part of tokenising 1M rows.
    prompt_ids, response_ids = _encode(tokenizer, prompts), _encode(tokenizer, responses)
    out: dict[str, list] = {"input_ids": [], "labels": [], "skip": [], "truncated": []}
    for p_ids, r_ids, reason in zip(prompt_ids, response_ids, reasons, strict=True):
        if not reason and len(p_ids) >= max_length:
            reason = f"prompt has {len(p_ids)} tokens, max_length is {max_length}"
        truncated = len(p_ids) + len(r_ids) > max_length
        ids = (p_ids + r_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
        out["input_ids"].append([] if reason else ids)
        out["labels"].append([] if reason else labels)
        out["skip"].append(reason)
        out["truncated"].append(truncated and not reason)
    return out


CACHE_LAYOUT = "ids-int32-labels-int32"


def _fingerprint(tokenizer, examples, max_length: int) -> str:
    digest = hashlib.sha1()
    # The cached file's layout is part of the key: a file written by an older layout (e.g.
    # int64 token ids) must not be read back under a newer one.
    digest.update(CACHE_LAYOUT.encode())
    digest.update(str(tokenizer.name_or_path).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(str(len(tokenizer)).encode())
    digest.update(str(max_length).encode())
    for ex_id, messages in _ids_and_messages(examples):
        digest.update(ex_id.encode())
        digest.update(messages.encode())
    return digest.hexdigest()[:20]


def _ids_and_messages(examples):
    """(id, messages as JSON) per example; from an `Examples` file without decoding it."""
    if isinstance(examples, Examples):
        table = examples.as_dataset().with_format("arrow")
        for start in range(0, len(table), 10_000):
            part = table[start:start + 10_000]
            yield from zip(part.column("id").to_pylist(), part.column("messages").to_pylist(),
                           strict=True)
    else:
        for e in examples:
            yield e["id"], json.dumps(e["messages"], ensure_ascii=False)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    num_proc: int | None = None,
    cache: bool = True,
    desc: str = "tokenising",
) -> Tokenized:
    """Tokenise with `datasets.map` (batched, optionally multi-process, cached on disk keyed by
    tokenizer + template + data, so a rerun on the same data skips the work)."""
    import datasets

    if isinstance(examples, Examples):  # already Arrow, messages already JSON
        table = examples.as_dataset().select_columns(["messages"])
    else:
        table = datasets.Dataset.from_dict(
            {"messages": [json.dumps(e["messages"], ensure_ascii=False) for e in examples]}
        )
    fingerprint = _fingerprint(tokenizer, examples, max_length)
    cache_file = None
    if cache:
        cache_dir = CACHE_DIR / "tokenized"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = str(cache_dir / f"{fingerprint}.arrow")
    mapped = table.map(
        _tokenize_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=["messages"],
        num_proc=num_proc if num_proc and num_proc > 1 and len(examples) >= 2000 else None,
        cache_file_name=cache_file,
        load_from_cache_file=cache,
        # Our own key, so that datasets does not derive one by pickling the tokenizer, which
        # for a large vocabulary costs more than tokenising a few hundred rows.
        new_fingerprint=fingerprint,
        desc=desc,
        # int32, not the inferred int64: half the disk and page cache for a million rows.
        features=datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "skip": datasets.Value("string"), "truncated": datasets.Value("bool")}),
    )
    return _account(mapped.data.table, examples)


def _account(table, examples) -> Tokenized:
    """Usable rows, and the ids of the skipped / truncated ones, from the mapped table's
    columns (vectorised: no per-row Python objects for the usable majority)."""
    import pyarrow.compute as pc

    skip = table.column("skip")
    skipped_rows = np.flatnonzero(pc.not_equal(skip, "").to_numpy(zero_copy_only=False))
    truncated_rows = np.flatnonzero(table.column("truncated").to_numpy(zero_copy_only=False))
    usable = np.ones(table.num_rows, dtype=bool)
    usable[skipped_rows] = False
    return Tokenized(
        table, np.flatnonzero(usable),
        skipped={examples[r]["id"]: skip[int(r)].as_py() for r in skipped_rows},
        truncated=[examples[r]["id"] for r in truncated_rows],
    )


def require_usable(tokenized: Tokenized, source: str, max_length: int) -> None:
    if len(tokenized) == 0:
        reasons = sorted(set(tokenized.skipped.values()))[:3]
        raise DataError(
            f"{source}: none of the {len(tokenized.skipped)} examples can be used "
            f"({'; '.join(reasons)}); raise max_length (now {max_length}) or fix the data"
        )


def collate(tokenized: Tokenized, positions: list[int], pad_id: int,
            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch of the usable examples at `positions` (indices into `tokenized`),
    on `device` when given."""
    id_rows, label_rows = tokenized.take(positions)
    length = max(len(row) for row in id_rows)
    ids = torch.full((len(positions), length), pad_id, dtype=torch.long)
    labels = torch.full((len(positions), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(positions), length), dtype=torch.long)
    for k, (row_ids, row_labels) in enumerate(zip(id_rows, label_rows, strict=True)):
        n = len(row_ids)
        ids[k, :n] = torch.from_numpy(row_ids)
        labels[k, :n] = torch.from_numpy(row_labels)
        mask[k, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "positions": torch.tensor(positions, dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def response_start(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Column of each row's first response token in a collated batch."""
    return (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1)


def splice_reply(batch: dict[str, torch.Tensor], reply: Sequence[int], pad_id: int,
                 max_length: int) -> dict[str, torch.Tensor]:
    """`batch` with every row's response replaced by the token ids `reply`: each row's own
    prompt tokens, then `reply`, cut at `max_length` and right-padded, labels on the reply
    only. What tokenising each row's prompt answered by the reply's text gives, for a chat
    template that renders a reply the same after any prompt (the caller checks that), at the
    cost of a tensor copy instead of two template renderings per row."""
    labels = batch["labels"]
    start = response_start(batch).tolist()
    ends = [min(s + len(reply), max_length) for s in start]
    width = max(ends)
    reply_ids = torch.as_tensor(list(reply), dtype=torch.long, device=labels.device)
    ids = torch.full((len(start), width), pad_id, dtype=torch.long, device=labels.device)
    out_labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for k, (s, end) in enumerate(zip(start, ends, strict=True)):
        ids[k, :s] = batch["input_ids"][k, :s]
        ids[k, s:end] = reply_ids[:end - s]
        out_labels[k, s:end] = reply_ids[:end - s]
        mask[k, :end] = 1
    return {**batch, "input_ids": ids, "labels": out_labels, "attention_mask": mask}


def tokenize_inputs(args, tokenizer, examples: Sequence[Example], safe: list):
    """Tokenised fine-tuning data and upper-level data: a `Tokenized`, or for preference
    pairs a (chosen, rejected) pair of `Tokenized` over the pairs usable on both sides."""
    tokenized = tokenize_examples(examples, tokenizer, args.max_length, args.num_proc,
                                  desc="tokenising fine-tuning data")
    require_usable(tokenized, args.finetune_data, args.max_length)
    if not safe:
        return tokenized, None
    if isinstance(safe[0], tuple):
        chosen = tokenize_examples([c for c, _ in safe], tokenizer, args.max_length,
                                   args.num_proc, desc="tokenising chosen answers")
        rejected = tokenize_examples([r for _, r in safe], tokenizer, args.max_length,
                                     args.num_proc, desc="tokenising rejected answers")
        both = np.intersect1d(chosen.rows, rejected.rows)
        chosen, rejected = chosen.subset(both), rejected.subset(both)
        require_usable(chosen, args.safe_data, args.max_length)
        return tokenized, (chosen, rejected)
    safe_tok = tokenize_examples(safe, tokenizer, args.max_length, args.num_proc,
                                 desc="tokenising safe set")
    require_usable(safe_tok, args.safe_data, args.max_length)
    return tokenized, safe_tok
