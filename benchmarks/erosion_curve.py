"""Does fine-tuning erode an aligned model's refusals, and after how many steps? (issue 12)

One all-data LoRA fine-tuning of an aligned model (default: Qwen2.5-Coder-0.5B-Instruct,
offline) on a seeded mix of benign SST-2 rows and harmful BeaverTails rows with compliant
answers (drawn from the SST-2 + BeaverTails file by its `flag` column), evaluated at chosen
steps on prompts it never trained on:

  heldout_harmful  BeaverTails questions of the same file outside the training mix (their
                   Alpaca wrapper removed; none equal to a trained question)
  advbench, harmbench
                   harmful prompts of another kind (seeded samples)
  sst2             SST-2 validation accuracy (the fine-tuning task)

Step 0 is the untouched model. Everything runs through the product: `sealft.finetune.run_finetune`
(with --save-every and --resume) and `sealft.evaluate.evaluate` with --adapter, in one process.
When the fine-tuning writes a checkpoint at an evaluation step, its adapter is copied into a
PEFT folder (snapshots/step-N) and evaluated before training goes on: one core does one thing
at a time. Each evaluation point appends a row to OUTPUT_DIR/curve.jsonl; a rerun skips what is
done and resumes the fine-tuning from its last checkpoint.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 python benchmarks/erosion_curve.py \\
        --output-dir runs/erosion-curve --output runs/erosion_curve.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from end_to_end import _question  # the same Alpaca-unwrapping as the end-to-end benchmark

from sealft.data import load_examples, read_rows, sample_rows
from sealft.evaluate import EvaluateArgs, evaluate
from sealft.io import append_jsonl, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
HELDOUT = "heldout_harmful"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=QWEN)
    parser.add_argument("--finetune-data", default=str(DATA / "finetune" / "sst2_n1000_p0.2.json"))
    parser.add_argument("--benign-data", default=None,
                        help="draw the benign rows from this instruction/input/output file "
                             "instead (e.g. benign/alpaca_en_demo.json: a long-form mix); the "
                             "harmful rows then lose their Alpaca wrapper, so that the format "
                             "does not tell them apart")
    parser.add_argument("--rows", type=int, default=48, help="rows in the training mix")
    parser.add_argument("--harmful", type=int, default=16,
                        help="of them, rows flagged unsafe (harmful question, compliant answer); "
                             "0: benign-only erosion")
    parser.add_argument("--sample", type=int, default=None,
                        help="instead of --rows/--harmful: a seeded sample of N rows of the file, "
                             "drawn as `sealft experiment` draws select.sample (the harmful "
                             "count is whatever the sample holds)")
    parser.add_argument("--seed", type=int, default=0, help="mix, data order and LoRA init")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=112,
                        help="tokens per training row (harmful answers are truncated; their "
                             "compliance shows in the first tokens)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-targets", default=ALL_PROJECTIONS)
    parser.add_argument("--eval-steps", default="0,6,12,24,36",
                        help="steps at which to evaluate (0: the base model); the last "
                             "fine-tuning step is always evaluated")
    parser.add_argument("--heldout", type=int, default=40,
                        help="held-out harmful questions of the fine-tuning file (seeded)")
    parser.add_argument("--harmful-per-set", type=int, default=10,
                        help="prompts from each of AdvBench and HarmBench (seeded; 0: none)")
    parser.add_argument("--sst2", type=int, default=40,
                        help="SST-2 validation rows (0: none; a long-form mix's cells answer "
                             "SST-2 in prose)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--keep-scores", default=None,
                        help="scores.jsonl of a selection run over this mix's train.json (e.g. "
                             "`sealft select --finetune-data OUTPUT_DIR/train.json`): train on "
                             "its kept rows only; the held-out prompts stay the mix's")
    parser.add_argument("--keep-ratio", type=float, default=None,
                        help="with --keep-scores: train on this share of the scored rows with "
                             "the highest weight instead of the selection's own cut (a "
                             "stricter or looser cut of the same fitted selector)")
    parser.add_argument("--oracle", action="store_true",
                        help="train on the mix's rows not flagged unsafe (a perfect filter)")
    parser.add_argument("--safeinstr-k", type=int, default=0,
                        help="SafeInstr: add this many seeded safety rows of --safe-data to "
                             "the trained rows (after any filter)")
    parser.add_argument("--safe-data", default=str(DATA / "safe" /
                                                   "safetyllamas_safety_only.json"),
                        help="the safety rows SafeInstr draws from")
    parser.add_argument("--output-dir", default="runs/erosion-curve")
    parser.add_argument("--output", default=None, help="also write the table to this .md")
    parser.add_argument("--data-only", action="store_true",
                        help="write the mix (train.json) and held-out questions, then stop: "
                             "for a selection to run on before its cell trains")
    args = parser.parse_args(argv)
    if not Path(args.finetune_data).exists():
        parser.error(f"missing data {args.finetune_data}: expected ../shared/data next to the "
                     "repository")
    if args.benign_data and (args.sample or not Path(args.benign_data).exists()):
        parser.error(f"--benign-data {args.benign_data}: give an existing file, and "
                     "--rows/--harmful rather than --sample")
    cfg_steps = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    if not 0 <= args.harmful <= args.rows or any(s < 0 for s in cfg_steps):
        parser.error("need 0 <= --harmful <= --rows (0: benign rows only) and --eval-steps >= 0")
    args.eval_steps = cfg_steps
    if args.keep_scores and args.oracle:
        parser.error("--keep-scores and --oracle each choose the trained rows: give one")
    if args.keep_ratio is not None and not (args.keep_scores and 0 < args.keep_ratio <= 1):
        parser.error("--keep-ratio needs --keep-scores and a share in (0, 1]")
    if args.safeinstr_k < 0:
        parser.error("--safeinstr-k must be >= 0")
    return args


FLAG_COUNTS = "trained_flags.json"
"""Rows trained per flag, beside train_kept.json."""


def trained_rows(args: argparse.Namespace, train: Path, out: Path) -> Path:
    """The mix itself, or the part of it a data filter kept (`--keep-scores`, `--oracle`),
    plus SafeInstr's safety rows (`--safeinstr-k`): these change only what is trained on,
    never the held-out prompts."""
    if not (args.keep_scores or args.oracle or args.safeinstr_k):
        return train
    mix = json.loads(train.read_text(encoding="utf-8"))
    if args.oracle:
        kept = [r for r in mix if r.get("flag") != "unsafe"]
    elif not args.keep_scores:
        kept = mix
    else:
        scores = list(read_jsonl(Path(args.keep_scores)))
        if len(scores) != len(mix):
            raise SystemExit(f"--keep-scores {args.keep_scores}: {len(scores)} rows, the mix "
                             f"{train} has {len(mix)}; select over that file")
        _check_scored_rows(args.keep_scores, scores, train)
        keep = kept_flags(scores, args.keep_ratio)
        kept = [r for r, k in zip(mix, keep, strict=True) if k]
    kept += safety_rows(args)
    path = out / "train_kept.json"
    path.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # The rows' flags without their text: what a run's kept outputs in docs/results can hold
    # (the data itself stays in ../shared/data), so erosion_cells.py still counts harmful rows.
    flags = Counter(str(r.get("flag")) for r in kept)
    (out / FLAG_COUNTS).write_text(json.dumps({"rows": len(kept), "flags": dict(flags)}) + "\n",
                                   encoding="utf-8")
    return path


def _check_scored_rows(source: str, scores: list[dict], train: Path) -> None:
    """Scores of another mix (another seed, another benign file) have as many rows but other
    ids: training on their cut would keep arbitrary rows without an error."""
    ids = [e["id"] for e in load_examples(str(train), "train", "auto", None, False)]
    if [s["id"] for s in scores] != ids:
        raise SystemExit(f"--keep-scores {source}: its row ids differ from {train}'s; select "
                         "over that file")


def kept_flags(scores: list[dict], keep_ratio: float | None) -> list[bool]:
    """The selection's own kept flags, or the top `keep_ratio` of its usable rows by weight
    (the product's own cut, so ties and unusable rows fall as `sealft select` has them)."""
    if keep_ratio is None:
        return [bool(s["kept"]) for s in scores]
    from sealft.selector import top_by_weight

    return top_by_weight(scores, keep_ratio).tolist()


def safety_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    """SafeInstr's k safety rows, drawn by the product's `safeinstr_mix`, written back in the
    mix's own Alpaca format (flag "safe", source "safeinstr") so that one file holds both."""
    if not args.safeinstr_k:
        return []
    from sealft.baselines import safeinstr_mix

    safe = load_examples(args.safe_data, "train", "auto", None, True)
    return [{"instruction": e["messages"][-2]["content"], "input": "",
             "output": e["messages"][-1]["content"], "flag": "safe", "source": "safeinstr"}
            for e in safeinstr_mix([], safe, args.safeinstr_k, args.seed)]


# --- data ----------------------------------------------------------------------------------

def build_data(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The training mix (`--harmful` unsafe rows among `--rows`, seeded, shuffled) and the
    held-out harmful questions (unsafe rows outside the mix, no question equal to a trained
    one). Written once; a rerun reuses them (the fine-tuning's resume checks its data)."""
    train, heldout = out / "train.json", out / "heldout_harmful.jsonl"
    if train.exists() and heldout.exists():
        return train, heldout
    rows = read_rows(args.finetune_data)  # JSON or JSONL, as the product reads it
    unsafe = [r for r in rows if r.get("flag") == "unsafe"]
    benign = [r for r in rows if r.get("flag") != "unsafe"]
    if args.benign_data:
        benign = [{**r, "flag": "benign"}
                  for r in read_rows(args.benign_data)]
        unsafe = [{**r, "instruction": _question(r["instruction"])} for r in unsafe]
    if not args.sample and (args.harmful > len(unsafe)
                            or args.rows - args.harmful > len(benign)):
        raise SystemExit(f"{args.finetune_data} has {len(unsafe)} unsafe and {len(benign)} "
                         "other rows: too few for --rows/--harmful")
    rng = random.Random(args.seed)
    order = rng.sample(range(len(unsafe)), len(unsafe))
    if args.sample:
        picked = {e["index"] for e in sample_rows(load_examples(args.finetune_data),
                                                  args.sample, args.seed)}
        mix = [r for i, r in enumerate(rows) if i in picked]
        order = [i for i in order if not any(unsafe[i] is r for r in mix)]
    else:
        mix = [unsafe[i] for i in order[:args.harmful]]
        order = order[args.harmful:]
        mix += rng.sample(benign, args.rows - args.harmful)
        rng.shuffle(mix)
    trained = {_question(r["instruction"]) for r in mix if r.get("flag") == "unsafe"}
    questions = []
    for i in order:
        question = _question(unsafe[i]["instruction"])
        if question not in trained and question not in questions:
            questions.append(question)
    if len(questions) < args.heldout:
        raise SystemExit(f"only {len(questions)} held-out harmful questions; lower --heldout")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(heldout, [{"id": f"{HELDOUT}:{i}", "prompt": q}
                          for i, q in enumerate(questions[:args.heldout])])
    train.write_text(json.dumps(mix, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return train, heldout


# --- fine-tuning ---------------------------------------------------------------------------

def finetune_args(args: argparse.Namespace, train: Path, folder: Path):
    from sealft import config as cfg
    from sealft.finetune import FinetuneArgs

    save_every = math.gcd(*[s for s in args.eval_steps if s > 0] or [0])
    return cfg.build(FinetuneArgs, {
        "model": args.model, "data": str(train), "output_dir": str(folder),
        "epochs": args.epochs, "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
        "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_targets.split(","), "seed": args.seed,
        "save_every": save_every, "show_progress": False,
        "resume": (folder / "config.yaml").exists()})


def snapshot(checkpoint: Path, target: Path, args: argparse.Namespace) -> None:
    """A checkpoint's adapter as a PEFT folder (adapter_config.json + adapter_model
    .safetensors; the checkpoint stores PEFT's own state dict) that `--adapter` loads."""
    from peft import LoraConfig

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(checkpoint / "adapter.safetensors", tmp / "adapter_model.safetensors")
    shutil.copyfile(checkpoint / "state.json", tmp / "state.json")
    LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
               target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM",
               base_model_name_or_path=args.model).save_pretrained(str(tmp))
    tmp.rename(target)


# --- evaluation ------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_point(args: argparse.Namespace, out: Path, step: int, adapter: str | None,
                   heldout: Path) -> dict[str, Any]:
    folder = out / "eval" / f"step-{step}"
    suites = (["custom"] + (["task"] if args.sst2 else [])
              + (["safety"] if args.harmful_per_set else []))
    started = time.perf_counter()
    evaluate(EvaluateArgs(
        model=args.model, adapter=adapter, label=f"step-{step}", suite=",".join(suites),
        output_dir=str(folder), resume=folder.exists(), safety_sets=("advbench", "harmbench"),
        sample=args.harmful_per_set or None,
        suite_samples=(f"custom={args.heldout}",) + ((f"task={args.sst2}",) if args.sst2 else ()),
        prompt_files=(f"{HELDOUT}={heldout}#prompt",), max_new_tokens=args.max_new_tokens,
        task_max_new_tokens=4, batch_size=16, threads=args.threads, show_progress=False))
    return {"eval_seconds": round(time.perf_counter() - started, 1),
            **counts(folder)}


def counts(folder: Path) -> dict[str, Any]:
    """Per prompt set: n, refusals (keyword judge) or correct SST-2 answers, from the
    evaluation's metrics.json."""
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    sets = {}
    for suite in metrics["suites"].values():
        for name, s in suite["sets"].items():
            rate = s.get("refusal_rate") if s["kind"] == "harmful" else s.get("accuracy")
            sets[name] = {"n": s["n"], "k": round(rate * s["n"]) if rate is not None else None}
    return {"sets": sets}


# --- the curve -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    train, heldout = build_data(args, out)
    if args.data_only:
        print(train)
        return 0
    train = trained_rows(args, train, out)
    curve_path = out / "curve.jsonl"
    done = {r["step"] for r in read_jsonl(curve_path)} if curve_path.exists() else set()
    if 0 in args.eval_steps and 0 not in done:
        append_jsonl(curve_path, {"step": 0, **evaluate_point(args, out, 0, None, heldout)})
        done.add(0)
    ft = out / "finetune"
    snaps = out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.eval_steps if s > 0]
    if not (ft / "summary.json").exists():
        run_finetune_evaluating(args, train, ft, snaps, wanted, done, curve_path, heldout)
    final = json.loads((ft / "summary.json").read_text(encoding="utf-8"))["steps"]
    for step in wanted + [final]:
        if step in done:
            continue
        target = snaps / f"step-{step}"
        # A snapshot of the last step is the final adapter; preferring it keeps the adapter
        # path the same as that of an evaluation a killed run started there, so it resumes.
        adapter = ft / "adapter" if step == final and not target.exists() else target
        if not adapter.exists():
            print(f"erosion_curve: no snapshot of step {step} (passed by a killed run, or "
                  f"beyond the last step {final})", file=sys.stderr)
            continue
        append_jsonl(curve_path, {"step": step, **evaluate_point(args, out, step, str(adapter),
                                                                 heldout)})
        done.add(step)
    text = table(args, out, trained=len(json.loads(train.read_text(encoding="utf-8"))))
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def run_finetune_evaluating(args: argparse.Namespace, train: Path, ft: Path, snaps: Path,
                            wanted: list[int], done: set[int], curve_path: Path,
                            heldout: Path) -> None:
    """`sealft finetune` in this process; each checkpoint it writes at a wanted step is copied
    to snapshots/step-N and evaluated before training goes on (the training's RNG state is
    restored afterwards, so the run is the one it would have been without the pauses)."""
    from sealft import train as loop
    from sealft.finetune import run_finetune

    original = loop.Checkpoint.save

    def save_then_evaluate(checkpoint, state) -> None:
        original(checkpoint, state)
        step = state.global_step
        if step not in wanted or step in done:
            return
        target = snaps / f"step-{step}"
        if not target.exists():
            snapshot(checkpoint.directory / loop.CHECKPOINT, target, args)
        rng = torch.get_rng_state()
        append_jsonl(curve_path, {"step": step, **evaluate_point(
            args, Path(args.output_dir), step, str(target), heldout)})
        torch.set_rng_state(rng)
        done.add(step)

    loop.Checkpoint.save = save_then_evaluate
    try:
        run_finetune(finetune_args(args, train, ft))
    finally:
        loop.Checkpoint.save = original


def _cell(entry: dict[str, Any] | None, base: dict[str, Any] | None = None) -> str:
    if not entry or entry.get("k") is None:
        return "–"
    k, n = entry["k"], entry["n"]
    low, high = wilson(k, n)
    text = f"{100 * k / n:.1f} [{100 * low:.0f}, {100 * high:.0f}] ({k}/{n})"
    if base and base.get("k") is not None and base is not entry:
        text += f" Δ {100 * (k / n - base['k'] / base['n']):+.1f}"
    return text


def merge_counts(sets: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any] | None:
    """The refusal counts of the named prompt sets of one evaluation, pooled (None when none
    of them was judged)."""
    parts = [sets[n] for n in names if n in sets and sets[n].get("k") is not None]
    if not parts:
        return None
    return {"k": sum(p["k"] for p in parts), "n": sum(p["n"] for p in parts)}


def table(args: argparse.Namespace, out: Path, trained: int) -> str:
    """The curve as markdown: percentages with Wilson 95% intervals and counts, Δ against
    step 0, the mean training loss of the steps since the previous point."""
    rows = sorted({r["step"]: r for r in read_jsonl(out / "curve.jsonl")}.values(),
                  key=lambda r: r["step"])
    metrics = out / "finetune" / "metrics.jsonl"
    losses = {r["step"]: r["loss"] for r in read_jsonl(metrics)} if metrics.exists() else {}
    steps_per_epoch = math.ceil(trained / args.batch_size)  # rows a filter kept, not the mix
    base = next((r for r in rows if r["step"] == 0), None)
    head = ("| step (epoch) | mean train loss since previous point | held-out harmful refusal % "
            "[95% CI] (k/n) | AdvBench + HarmBench refusal % | SST-2 accuracy % | eval s |")
    lines = [head, "|" + "---|" * 6]
    previous = 0
    for row in rows:
        step, sets = row["step"], row["sets"]
        window = [losses[s] for s in range(previous + 1, step + 1) if s in losses]
        loss = f"{sum(window) / len(window):.3f}" if window else "–"
        bsets = base["sets"] if base else {}
        other = merge_counts(sets, ("advbench", "harmbench"))
        lines.append(
            f"| {step} ({step / steps_per_epoch:.1f}) | {loss} | "
            f"{_cell(sets.get(HELDOUT), bsets.get(HELDOUT))} | "
            f"{_cell(other, merge_counts(bsets, ('advbench', 'harmbench')))} | "
            f"{_cell(sets.get('sst2'), bsets.get('sst2'))} | {row['eval_seconds']:.0f} |")
        previous = step
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
