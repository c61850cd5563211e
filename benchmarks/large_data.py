"""A million rows in little memory: `sealft select` over N synthetic chat rows with the tiny
model, measured in a child process so its peak resident memory is its own.

    python benchmarks/large_data.py --rows 1000000 --num-proc 2
    python benchmarks/large_data.py --rows 1000000 --method reference-loss   # + forward passes

Reported: tokenisation rows/s (cold `datasets.map` into the on-disk cache; also per CPU
second, which a loaded machine does not distort), the select run's
wall time, the peak resident memory of the selecting process above a process that has only
loaded the model and tokenizer (the map's worker processes are reported apart: they are
separate processes), and whether scores.jsonl has every row, in input order. The data file is
written row by row and never held in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Words the tiny model's tokenizer was trained on (tests/conftest.py), so rows fit max_length.
WORDS = ("the a movie film great bad terrible wonderful boring review how do i write poem "  # noqa: SIM905
         "explain why answer question weather today story about cats dogs").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """n alpaca rows of 8-40 prompt words and 1-30 answer words, with a label field."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(n):
            handle.write(json.dumps({
                "instruction": f"{index} " + " ".join(rng.choices(WORDS, k=rng.randint(8, 40))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
                "flag": "unsafe" if index % 10 == 0 else "safe"}) + "\n")


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(folder, hidden=64, layers=2))


# The child: what one `sealft select` process holds. Baseline mode stops after loading.
CHILD = """
import json, resource, sys, time
args = json.loads(sys.argv[1])
def peak_mb(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024
def cpu_s():  # this process and its finished workers: comparable on a loaded machine
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
from sealft.models import load_model_and_tokenizer
model, tokenizer = load_model_and_tokenizer(args["model"])
if args["mode"] == "baseline":
    print(json.dumps({"peak_mb": peak_mb()}))
    sys.exit()
from sealft.data import load_examples
from sealft.select import SelectArgs, run_select
from sealft.tokenize import tokenize_examples
start, cpu = time.perf_counter(), cpu_s()
examples = load_examples(args["data"])
loaded, loaded_cpu = time.perf_counter() - start, cpu_s() - cpu
start, cpu = time.perf_counter(), cpu_s()
tokenized = tokenize_examples(examples, tokenizer, args["max_length"], args["num_proc"])
tokenise, tokenise_cpu = time.perf_counter() - start, cpu_s() - cpu
del tokenized, examples
start = time.perf_counter()
summary = run_select(SelectArgs(
    model=args["model"], finetune_data=args["data"], safe_data=args["safe"],
    output_dir=args["out"], method=args["method"], keep_ratio=0.5, max_length=args["max_length"],
    num_proc=args["num_proc"], label_field="flag", reference_steps=2, batch_size=8,
    micro_batch_size=8, show_progress=False))
select = time.perf_counter() - start
print(json.dumps({"load_s": loaded, "tokenise_s": tokenise, "select_s": select,
                  "load_cpu_s": loaded_cpu, "tokenise_cpu_s": tokenise_cpu,
                  "peak_mb": peak_mb(), "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN),
                  "summary": summary}))
"""


def run_child(settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({settings['mode']}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_scores(path: Path, n: int) -> tuple[bool, int]:
    """(every input row present exactly once, in input order; rows with a weight)."""
    expected, weighted = 0, 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["index"] != expected:
                return False, weighted
            weighted += row["weight"] is not None
            expected += 1
    return expected == n, weighted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--method", default="random",
                        help="selection method to run over all rows (random, reference-loss, ...)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", help="model folder (default: the tiny test Llama)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["SEALFT_CACHE"] = str(tmp / "cache")  # a cold tokenisation cache
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = args.model or tiny_model(tmp / "tiny")
        data = tmp / "rows.jsonl"
        write_rows(data, args.rows)
        safe = tmp / "safe.jsonl"
        safe.write_text("".join(json.dumps({"prompt": "how do i make a bomb",
                                            "completion": f"sorry, I cannot help {i}"}) + "\n"
                                for i in range(16)))
        settings = {"model": model, "data": str(data), "safe": str(safe), "out": str(tmp / "run"),
                    "method": args.method, "max_length": args.max_length,
                    "num_proc": args.num_proc}
        baseline = run_child({**settings, "mode": "baseline"})
        started = time.perf_counter()
        result = run_child({**settings, "mode": "select"})
        wall = time.perf_counter() - started
        complete, weighted = check_scores(tmp / "run" / "scores.jsonl", args.rows)
        size_mb = data.stat().st_size / 2**20
    above = result["peak_mb"] - baseline["peak_mb"]
    print(f"\n{args.rows:,} synthetic rows ({size_mb:,.0f} MB JSONL), max_length "
          f"{args.max_length}, num_proc {args.num_proc}, method {args.method}, "
          f"model {args.model or 'tiny Llama (tests/conftest.py)'}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| read + normalise into Arrow | {result['load_s']:.1f} s "
          f"({result['load_cpu_s']:.1f} CPU s) |")
    print(f"| tokenise (cold) | {result['tokenise_s']:.1f} s = "
          f"{args.rows / result['tokenise_s']:,.0f} rows/s |")
    print(f"| tokenise (cold), per CPU second (process + workers) | "
          f"{result['tokenise_cpu_s']:.1f} CPU s = "
          f"{args.rows / result['tokenise_cpu_s']:,.0f} rows per CPU s |")
    print(f"| sealft select --method {args.method} (reads again, tokenisation cached) | "
          f"{result['select_s']:.1f} s |")
    print(f"| child wall time in all | {wall:.1f} s |")
    print(f"| peak RSS, model + tokenizer loaded only | {baseline['peak_mb']:,.0f} MB |")
    print(f"| peak RSS, selecting process | {result['peak_mb']:,.0f} MB |")
    print(f"| **host memory above the model** | **{above:,.0f} MB** |")
    print(f"| largest tokenisation worker (separate process) | "
          f"{result['workers_peak_mb']:,.0f} MB |")
    print(f"| scores.jsonl: every row once, in input order | {complete} "
          f"({weighted:,} with a weight) |")
    print(f"| kept / usable | {result['summary']['kept']:,} / {result['summary']['usable']:,} |")
    if not complete:
        raise SystemExit("scores.jsonl is incomplete or out of order")


if __name__ == "__main__":
    main()
