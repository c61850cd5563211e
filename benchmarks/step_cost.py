"""Cost of one selector step relative to one LoRA SFT step, on the same model and batch.

Time: one process loads the model with both adapters and times every variant in round-robin
(one step of each per round, `--steps` rounds after a warm-up round), so that a shared
machine's drifting load hits all variants alike; the median per variant is reported.
Memory: each variant also runs alone in its own process with only the adapters it needs, and
reports its peak resident memory above what the loaded model took (CPU) or its peak allocated
memory (CUDA); its time there is shown too, as a second, less controlled ratio.

    python benchmarks/step_cost.py                       # tiny Llama and SmolLM2-135M-Instruct
    python benchmarks/step_cost.py --models tiny --steps 20
    python benchmarks/step_cost.py --models Qwen/Qwen2.5-Coder-0.5B-Instruct --variants sft score \
        --data ../shared/data/benign/alpaca_en_demo.json --max-length 192 --side-by-side-only

The parts come from the library (`seal.bilevel_parts`, `finetune.sft_step`, `seal.Scorer`),
so the steps timed are the ones `sealft select` / `finetune` / `score` run.

Pass-count limits: an Algorithm 2 step does two backward passes' worth of work (fine-tuning
batch + safe batch), Algorithm 1 three; so the targets are ≤ 2.1× and ≤ 3.2× SFT, memory ≤ 1.15×.
A scored row is one forward pass over its prompt (and first response token): target ≤ 0.4×
an SFT row.
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
VARIANTS = ("sft", "memory-efficient", "penalty", "safety-step", "score", "score-retokenise")
"""`score`: the scoring pass (`seal.Scorer`, forward passes only) over `--score-rows` rows.
`score-retokenise`: the same pass with every row's refusal conversations rendered and tokenised
(what it does where a chat template words a reply by its context), to show what splicing the
refusals' reply tokens after each prompt saves."""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(n: int, seed: int, data: str | None):
    """`n` rows of `data` (a file `sealft select` reads), or synthetic 60-word prompts with
    40-word answers."""
    import random

    from sealft.data import load_examples, normalise

    if data:
        return load_examples(data, limit=n)
    rng = random.Random(seed)
    words = "the movie was great terrible boring fun how do i make a bomb sorry no".split()  # noqa: SIM905
    return normalise([{"prompt": " ".join(rng.choices(words, k=60)),
                       "completion": " ".join(rng.choices(words, k=40))} for _ in range(n)])


def _batches(tokenized, micro: int, pad: int, device: str):
    """Micro-batches already on the model's device, as the product's loops hand them over."""
    from sealft.tokenize import collate

    n = len(tokenized)
    return [collate(tokenized, list(range(k, min(n, k + micro))), pad, device)
            for k in range(0, n, micro)]


def _settings(args: argparse.Namespace):
    """The benchmark's options as a selection run records them (Algorithm 1 needs both
    adapters, so every variant can run on one model)."""
    from sealft.selection_run import SelectArgs

    return SelectArgs(finetune_data="-", safe_data="-", output_dir="-", algorithm="penalty",
                      lr=1e-5, selector_lr=5e-3, max_length=args.max_length,
                      micro_batch_size=args.micro, dtype=args.dtype,
                      gradient_checkpointing=args.gradient_checkpointing, show_progress=False)


def _step_functions(args: argparse.Namespace, variants: tuple[str, ...]):
    """Load the model once, attach the adapters the variants need, and return one zero-argument
    step function per variant (all on this one model, so they can be timed side by side),
    with the rows each step covers."""
    from sealft import bilevel
    from sealft.finetune import sft_step
    from sealft.models import add_lora_adapters, load_model_and_tokenizer
    from sealft.runtime import lora_settings
    from sealft.seal import Scorer, bilevel_parts, selector_adapters
    from sealft.tokenize import tokenize_examples

    torch.manual_seed(0)
    settings = _settings(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    pad = tokenizer.pad_token_id
    ft_rows, safe_rows = _rows(args.batch, 0, args.data), _rows(args.batch, 1, args.data)
    ft_tok = tokenize_examples(ft_rows, tokenizer, args.max_length, cache=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ft = _batches(ft_tok, args.micro, pad, device)
    safe = _batches(tokenize_examples(safe_rows, tokenizer, args.max_length, cache=False),
                    args.micro, pad, device)
    # The model's own memory, in the unit peak_memory_mb reports: host RSS on CPU, allocated
    # GPU memory on CUDA (so "above model" never subtracts host bytes from GPU bytes).
    base_rss = _rss_mb()
    if torch.cuda.is_available():
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
        base_rss = torch.cuda.memory_allocated() / 2**20
    bilevel_variants = [v for v in variants if v in bilevel.ALGORITHMS]
    adapters = (selector_adapters(settings.algorithm) if bilevel_variants
                else (bilevel.THETA,))
    model = add_lora_adapters(model, lora_settings(settings), adapters,
                              args.gradient_checkpointing)
    model.train()
    steps, rows = {}, {}
    if "sft" in variants:
        from accelerate import Accelerator

        from sealft.models import adapter_parameters

        # The product's SFT step takes an Accelerator (backward, no_sync, reduce); with one
        # process it adds no work.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        optimizer = torch.optim.Adam(adapter_parameters(model, bilevel.THETA), lr=1e-5)

        def sft():
            model.set_adapter(bilevel.THETA)
            sft_step(model, optimizer, ft, None, 1.0 / args.batch, accelerator)
        steps["sft"], rows["sft"] = sft, len(ft_tok)
    if bilevel_variants:
        parts = bilevel_parts(model, args.batch, settings)
        for variant in bilevel_variants:
            steps[variant] = partial(bilevel.ALGORITHMS[variant], parts, ft, safe, 0.05,
                                     args.batch, args.batch)
            rows[variant] = len(ft_tok)
    score_variants = [v for v in variants if v.startswith("score")]
    if score_variants:
        scored = _rows(args.score_rows or args.batch, 0, args.data)
        scored_tok = tokenize_examples(scored, tokenizer, args.max_length, cache=False)
        usable = [scored[r] for r in scored_tok.rows]
    for variant in score_variants:
        scorer = Scorer(model, tokenizer, settings)
        if variant == "score-retokenise":
            scorer.refusal_replies = lambda *_: None  # as if the splice check had failed

        def score(scorer=scorer):
            model.eval()  # as after a fit: no LoRA dropout in the scoring pass
            scorer.score_tokenized(scored_tok, usable, show_progress=False)
            model.train()
        steps[variant], rows[variant] = score, len(scored_tok)
    return steps, rows, base_rss


def run_variant(args: argparse.Namespace) -> dict:
    """One variant alone in this process: its peak memory is its own."""
    step_of, rows, base_rss = _step_functions(args, (args.variant,))
    step = step_of[args.variant]
    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_memory_mb()
    return {"median_s": statistics.median(times), "rows": rows[args.variant], "peak_mb": peak,
            "above_model_mb": peak - base_rss}


def run_interleaved(args: argparse.Namespace) -> dict:
    """Every variant on one model in one process, in round-robin: round r times one step of
    each. A shared machine's load drifts over minutes; interleaving exposes every variant to
    the same drift, so the ratios are side by side rather than minutes apart."""
    steps, rows, _ = _step_functions(args, args.variants)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(args.steps):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return {v: {"median_s": statistics.median(t), "rows": rows[v]} for v, t in times.items()}


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(folder, hidden=64, layers=2))


def _child(args: argparse.Namespace, model: str, *mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *mode, "--model", model, "--steps", str(args.steps),
         "--batch", str(args.batch), "--micro", str(args.micro), "--dtype", args.dtype,
         "--max-length", str(args.max_length), "--variants", *args.variants,
         *(["--data", args.data] if args.data else []),
         *(["--score-rows", str(args.score_rows)] if args.score_rows else []),
         *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"step_cost child {' '.join(mode)} on {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_row(result: dict) -> float:
    return result["median_s"] / result["rows"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="steps to time (sft is always the reference)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per variant (rounds, side by side)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--data", help="rows to train and score on (any file `sealft select` "
                        "reads); default: synthetic 60-word prompts + 40-word answers")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row")
    parser.add_argument("--score-rows", type=int,
                        help="rows the score variant scores per round (default: --batch)")
    parser.add_argument("--side-by-side-only", action="store_true",
                        help="skip the per-variant processes (memory and 'alone' times)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every variant with activation checkpointing")
    parser.add_argument("--dtype", default="float32", help="model dtype (e.g. bfloat16 on GPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    args.variants = tuple(["sft"] + [v for v in args.variants if v != "sft"])
    if args.variant or args.interleaved:  # child process
        print(json.dumps(run_interleaved(args) if args.interleaved else run_variant(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = _tiny_model(Path(tmp) / "tiny") if name == "tiny" else name
            side = _child(args, model, "--interleaved")
            alone = {} if args.side_by_side_only else {
                v: _child(args, model, "--variant", v) for v in args.variants}
            for v in args.variants:
                solo = alone.get(v)
                rows.append((name, v, side[v]["rows"], side[v]["median_s"],
                             _per_row(side[v]) / _per_row(side["sft"]),
                             solo and _per_row(solo) / _per_row(alone["sft"]),
                             solo and solo["above_model_mb"],
                             solo and solo["peak_mb"] / alone["sft"]["peak_mb"]))
    source = args.data or "60-word prompts + 40-word answers"
    print(f"\nbatch {args.batch} (micro {args.micro}) of {source}, max length "
          f"{args.max_length}, median of {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.dtype}. Time: all variants "
          "on one model in one process, in round-robin (side by side); memory: each variant "
          "alone in its own process (its time there in the 'alone' column). Ratios are per "
          "row: a step's time over its batch, the score pass's over the rows it scored.\n")
    print("| model | step | rows | median s | × SFT time per row | × SFT time per row, alone "
          "| MB above model | × SFT peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for name, variant, n, sec, ratio, alone_ratio, above, mem in rows:
        print(f"| {name} | {variant} | {n} | {sec:.3f} | {ratio:.2f} | {_cell(alone_ratio, 2)} "
              f"| {_cell(above, 0)} | {_cell(mem, 3)} |")


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
