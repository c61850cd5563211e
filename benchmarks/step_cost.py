"""Cost of one selector step relative to one LoRA SFT step, on the same model and batch.

Time: one process loads the model with both adapters and times every variant in round-robin
(one step of each per round, `--steps` rounds after a warm-up round), so that a shared
machine's drifting load hits all variants alike; the median per variant is reported.
Memory: each variant also runs alone in its own process with only the adapters it needs, and
reports its peak resident memory above what the loaded model took (CPU) or its peak allocated
memory (CUDA); its time there is shown too, as a second, less controlled ratio.

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
from functools import partial
from pathlib import Path

import torch

from sealft.runtime import peak_memory_mb

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


def _step_functions(model_name: str, variants: tuple[str, ...], batch: int, micro: int,
                    checkpointing: bool = False, dtype: str = "float32"):
    """Load the model once, attach the adapters the variants need, and return one zero-argument
    step function per variant (all on this one model, so they can be timed side by side)."""
    from sealft import bilevel
    from sealft.finetune import sft_step
    from sealft.models import LoraSettings, adapter_parameters, add_lora_adapters, load_model_and_tokenizer
    from sealft.selector import Selector

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype)
    ft, safe = _batches(tokenizer, batch, micro, 0), _batches(tokenizer, batch, micro, 1)
    for b in ft:  # selector rows
        b["positions"] = b["positions"] % batch
    base_rss = _rss_mb()
    if torch.cuda.is_available():
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
    two = any(v in ("penalty", "safety-step") for v in variants)
    names = ("theta", "theta_prime") if two else ("theta",)
    model = add_lora_adapters(model, LoraSettings(), names, checkpointing)
    model.train()
    steps = {}
    if "sft" in variants:
        from accelerate import Accelerator

        # The product's SFT step takes an Accelerator (backward, no_sync, reduce); with one
        # process it adds no work.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        optimizer = torch.optim.Adam(adapter_parameters(model, "theta"), lr=1e-5)

        def sft():
            model.set_adapter("theta")
            sft_step(model, optimizer, ft, None, 1.0 / batch, accelerator)
        steps["sft"] = sft
    selector = Selector(batch)
    parts = bilevel.BilevelParts(
        model=model, selector=selector,
        theta_optimizer=torch.optim.Adam(adapter_parameters(model, "theta"), lr=1e-5),
        selector_optimizer=bilevel.VisitedRMSUpdate(selector, 5e-3),
        theta_prime_optimizer=torch.optim.Adam(adapter_parameters(model, "theta_prime"), lr=1e-5)
        if two else None,
    )
    for variant in variants:
        if variant != "sft":
            steps[variant] = partial(bilevel.ALGORITHMS[variant], parts, ft, safe, 0.05, batch,
                                     batch)
    return steps, base_rss


def run_variant(model_name: str, variant: str, steps: int, batch: int, micro: int,
                checkpointing: bool = False, dtype: str = "float32") -> dict:
    """One variant alone in this process: its peak memory is its own."""
    step_of, base_rss = _step_functions(model_name, (variant,), batch, micro, checkpointing,
                                        dtype)
    step = step_of[variant]
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_memory_mb()
    return {"median_s": statistics.median(times), "peak_mb": peak, "above_model_mb": peak - base_rss}


def run_interleaved(model_name: str, rounds: int, batch: int, micro: int,
                    checkpointing: bool = False, dtype: str = "float32") -> dict:
    """Every variant on one model in one process, in round-robin: round r times one step of
    each. A shared machine's load drifts over minutes; interleaving exposes every variant to
    the same drift, so the ratios are side by side rather than minutes apart."""
    steps = _step_functions(model_name, VARIANTS, batch, micro, checkpointing, dtype)[0]
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(folder, hidden=64, layers=2))


def _child(args: argparse.Namespace, model: str, *mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *mode, "--model", model, "--steps", str(args.steps),
         "--batch", str(args.batch), "--micro", str(args.micro), "--dtype", args.dtype,
         *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"step_cost child {' '.join(mode)} on {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per variant (rounds, side by side)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every variant with activation checkpointing")
    parser.add_argument("--dtype", default="float32", help="model dtype (e.g. bfloat16 on GPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant or args.interleaved:  # child process
        sizes = (args.batch, args.micro, args.gradient_checkpointing, args.dtype)
        result = (run_interleaved(args.model, args.steps, *sizes) if args.interleaved else
                  run_variant(args.model, args.variant, args.steps, *sizes))
        print(json.dumps(result))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = _tiny_model(Path(tmp) / "tiny") if name == "tiny" else name
            side_by_side = _child(args, model, "--interleaved")
            alone = {v: _child(args, model, "--variant", v) for v in VARIANTS}
            for variant in VARIANTS:
                rows.append((name, variant, side_by_side[variant],
                             side_by_side[variant] / side_by_side["sft"],
                             alone[variant]["median_s"] / alone["sft"]["median_s"],
                             alone[variant]["above_model_mb"],
                             alone[variant]["peak_mb"] / alone["sft"]["peak_mb"]))
    print(f"\nbatch {args.batch} (micro {args.micro}), 60-word prompts + 40-word answers, "
          f"median of {args.steps} steps, torch threads {torch.get_num_threads()}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.dtype}. Time: all "
          "variants on one model in one process, in round-robin (side by side); memory: each "
          "variant alone in its own process (its time there in the 'alone' column).\n")
    print("| model | step | median s | × SFT time | × SFT time, alone | MB above model "
          "| × SFT peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name, variant, sec, ratio, alone_ratio, above, mem in rows:
        print(f"| {name} | {variant} | {sec:.3f} | {ratio:.2f} | {alone_ratio:.2f} | {above:.0f} "
              f"| {mem:.3f} |")


if __name__ == "__main__":
    main()
