"""Large fine-tuning sets: tokenisation throughput (datasets.map, batched, num_proc, on-disk
cache) and the selector's memory overhead, on a synthetic N-example chat dataset.

    python benchmarks/large_data.py --rows 1000000 --num-proc 2

The tokenizer is SmolLM2-135M-Instruct's (offline package) or --tokenizer FOLDER.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time

import torch


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    from sealft.data import example_id

    rng = random.Random(seed)
    words = ("the a movie film great bad terrible wonderful boring review how do i write code "  # noqa: SIM905
             "explain why answer question weather today story about cats dogs").split()
    out = []
    for index in range(n):
        messages = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(8, 40)))},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))}]
        out.append({"id": f"{index}-{example_id(messages)}", "index": index,
                    "messages": messages, "meta": {}})
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--tokenizer", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SEALFT_CACHE"] = cache
        import importlib

        import sealft.models
        import sealft.tokenize

        importlib.reload(sealft.models)
        importlib.reload(sealft.tokenize)
        from sealft.bilevel import VisitedRMSUpdate
        from sealft.models import load_tokenizer
        from sealft.selector import Selector
        from sealft.tokenize import tokenize_examples

        tokenizer = load_tokenizer(args.tokenizer)
        start = time.perf_counter()
        examples = synthetic_examples(args.rows)
        build = time.perf_counter() - start
        start = time.perf_counter()
        first = tokenize_examples(examples, tokenizer, args.max_length, args.num_proc)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        tokenize_examples(examples, tokenizer, args.max_length, args.num_proc)
        warm = time.perf_counter() - start
        before = rss_mb()
        selector = Selector(args.rows)
        optimiser = VisitedRMSUpdate(selector, 5e-3)
        weights = selector.weights(torch.arange(64), local=True)
        (weights.sum()).backward()
        optimiser.step(torch.arange(64))
        selector_bytes = sum(t.numel() * t.element_size() for t in (
            selector.logits, selector.logits.grad))
        after = rss_mb()
    print(f"\n{args.rows:,} synthetic examples, max_length {args.max_length}, "
          f"num_proc {args.num_proc}, tokenizer {args.tokenizer}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| build example dicts | {build:.1f} s |")
    print(f"| tokenise (cold) | {cold:.1f} s = {args.rows / cold:,.0f} examples/s |")
    print(f"| tokenise again (on-disk cache) | {warm:.1f} s = {args.rows / warm:,.0f} examples/s |")
    print(f"| usable / skipped / truncated | {len(first)} / {len(first.skipped)} / "
          f"{len(first.truncated)} |")
    print(f"| selector tensors (logits + grad) | {selector_bytes / 2**20:.1f} MB |")
    print(f"| process peak RSS growth for selector + one step | {after - before:.1f} MB |")


if __name__ == "__main__":
    main()
