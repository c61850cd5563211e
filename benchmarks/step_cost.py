"""Cost of one selector step relative to one LoRA SFT step, on the same model and batch.

Each variant runs in its own process (so peak memory is its own): load the model, attach the
adapters it needs, run warm-up steps, then time `--steps` steps and report the median and the
peak resident memory above what the loaded model took (CPU) or peak allocated memory (CUDA).

    python benchmarks/step_cost.py                       # tiny Llama and SmolLM2-135M-Instruct
    python benchmarks/step_cost.py --models tiny --steps 20

Pass-count limits: an Algorithm 2 step does two backward passes' worth of work (fine-tuning
batch + safe batch), Algorithm 1 three; so the targets are ≤ 2.1× and ≤ 3.2× SFT, memory ≤ 1.15×.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sft", "memory-efficient", "penalty", "safety-step")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(tokenizer, n: int, micro: int, seed: int):
    import random

    from sealft.data import normalise
    from sealft.tokenize import collate, tokenize_examples

    rng = random.Random(seed)
    words = "the movie was great terrible boring fun how do i make a bomb sorry no".split()  # noqa: SIM905
    rows = [{"prompt": " ".join(rng.choices(words, k=60)),
             "completion": " ".join(rng.choices(words, k=40))} for _ in range(n)]
    tok = tokenize_examples(normalise(rows), tokenizer, 256, cache=False)
    return [collate(tok, list(range(k, min(n, k + micro))), tokenizer.pad_token_id)
            for k in range(0, n, micro)]


def run_variant(model_name: str, variant: str, steps: int, batch: int, micro: int) -> dict:
    from sealft import bilevel
    from sealft.finetune import sft_step
    from sealft.models import LoraSettings, adapter_parameters, add_lora_adapters, load_model_and_tokenizer
    from sealft.selector import Selector

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_name)
    ft, safe = _batches(tokenizer, batch, micro, 0), _batches(tokenizer, batch, micro, 1)
    for b in ft:  # selector rows
        b["positions"] = b["positions"] % batch
    base_rss = _rss_mb()
    if torch.cuda.is_available():
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
    names = ("theta", "theta_prime") if variant in ("penalty", "safety-step") else ("theta",)
    model = add_lora_adapters(model, LoraSettings(), names)
    model.train()
    if variant == "sft":
        from accelerate import Accelerator

        # The product's SFT step takes an Accelerator (backward, no_sync, reduce); with one
        # process it adds no work.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        optimizer = torch.optim.Adam(adapter_parameters(model, "theta"), lr=1e-5)

        def step():
            sft_step(model, optimizer, ft, None, 1.0 / batch, accelerator)
    else:
        selector = Selector(batch)
        parts = bilevel.BilevelParts(
            model=model, selector=selector,
            theta_optimizer=torch.optim.Adam(adapter_parameters(model, "theta"), lr=1e-5),
            selector_optimizer=bilevel.VisitedRMSUpdate(selector, 5e-3),
            theta_prime_optimizer=torch.optim.Adam(adapter_parameters(model, "theta_prime"),
                                                   lr=1e-5) if len(names) == 2 else None,
        )

        def step():
            bilevel.ALGORITHMS[variant](parts, ft, safe, 0.05, batch, batch)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_mb()
    return {"median_s": statistics.median(times), "peak_mb": memory,
            "above_model_mb": memory - base_rss}


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(folder, hidden=64, layers=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args.model, args.variant, args.steps, args.batch,
                                     args.micro)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = _tiny_model(Path(tmp) / "tiny") if name == "tiny" else name
            results = {}
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--model", model,
                     "--steps", str(args.steps), "--batch", str(args.batch),
                     "--micro", str(args.micro)],
                    capture_output=True, text=True, check=True)
                results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            sft = results["sft"]
            for variant, r in results.items():
                rows.append((name, variant, r["median_s"], r["median_s"] / sft["median_s"],
                             r["above_model_mb"], r["peak_mb"] / sft["peak_mb"]))
    print(f"\nbatch {args.batch} (micro {args.micro}), 60-word prompts + 40-word answers, "
          f"median of {args.steps} steps, torch threads {torch.get_num_threads()}\n")
    print("| model | step | median s | × SFT time | MB above model | × SFT peak memory |")
    print("|---|---|---|---|---|---|")
    for name, variant, sec, ratio, above, mem in rows:
        print(f"| {name} | {variant} | {sec:.3f} | {ratio:.2f} | {above:.0f} | {mem:.3f} |")


if __name__ == "__main__":
    main()
