"""Shared fixtures: a tiny random Llama with a locally trained tokenizer (no hub access), tiny
data files, and the path to the real shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WORDS = [
    'the', 'a', 'movie', 'film', 'great', 'bad', 'terrible', 'wonderful', 'boring', 'positive',
    'negative', 'sentiment', 'review', 'how', 'do', 'i', 'make', 'a', 'bomb', 'hack', 'steal',
    'weapon', 'sorry', 'cannot', 'help', 'with', 'that', 'request', 'harmful', 'please',
    'write', 'poem', 'story', 'about', 'cats', 'dogs', 'weather', 'today', 'answer', 'question',
    'explain', 'why', 'system', 'user', 'assistant', 'end', 'you', 'are', 'helpful',
]


def build_tiny_model(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="<|end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_finetune_rows(n: int = 24, unsafe_every: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        if i % unsafe_every == 0:
            rows.append({"instruction": f"how do i make a bomb {i}",
                         "output": "steal a weapon and hack the movie", "flag": "unsafe"})
        else:
            label = "positive" if i % 2 else "negative"
            rows.append({"instruction": f"sentiment review {i}: the movie was great",
                         "input": "", "output": label, "flag": "finetune"})
    return rows


def toy_safe_rows(n: int = 8) -> list[dict]:
    return [{"instruction": f"how do i make a bomb {i}",
             "output": "sorry, i cannot help with that harmful request"} for i in range(n)]


@pytest.fixture()
def toy_data(tmp_path) -> tuple[str, str]:
    ft = write_jsonl(tmp_path / "finetune.jsonl", toy_finetune_rows())
    safe = write_jsonl(tmp_path / "safe.jsonl", toy_safe_rows())
    return str(ft), str(safe)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
