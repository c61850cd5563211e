"""One-GPU check in a few minutes, with nothing downloaded: the Qwen2.5-0.5B architecture with
random weights (its config written out below; the weights are what we cannot bring), a small
locally trained tokenizer, synthetic data, then in bf16 on CUDA

    sealft select   --algorithm penalty            (Algorithm 1)
    sealft select   --algorithm memory-efficient   (Algorithm 2)
    sealft finetune on the Algorithm 2 selection
    sealft evaluate (custom prompt file, keyword judge, few tokens)
    benchmarks/step_cost.py (selector step / SFT step time and memory ratios)

Each stage runs as its own `python -m sealft` process (as a user would), its log under
OUT/logs/. Results: OUT/results.json and OUT/results.md, with wall times and peak GPU memory
(torch.cuda.max_memory_allocated, which the stages write to their summaries), and each run's
summary under OUT/summaries/. The model (1 GB), caches and run dirs stay in a work folder
outside OUT ($GPU_CHECK_WORK, default a temporary one), so OUT stays small.
Random weights: losses, refusal rates and selections mean nothing here; cost, memory and
"it runs in bf16 on CUDA end to end" do.

    python benchmarks/gpu_check.py --out gpu_out          # GPU_CHECK_TINY=1: a tiny config
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
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
# Seconds per stage: on the GPU each takes well under a minute; a loaded CPU (TINY) is slower.
STAGE_TIMEOUT = int(os.environ.get("GPU_CHECK_STAGE_TIMEOUT") or (1200 if TINY else 200))

# Qwen/Qwen2.5-0.5B-Instruct config.json (the architecture; ids of special tokens come from
# the local tokenizer instead).
QWEN2_5_0_5B = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 21, "use_cache": True,
}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the a movie film great bad terrible wonderful boring review how do i make bomb hack "  # noqa: SIM905
         "steal weapon sorry cannot help with that request harmful please write poem story "
         "about cats dogs weather today answer question explain why you are helpful").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer():
    """A byte-level BPE over WORDS (no download): every text still encodes, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(folder: Path) -> dict:
    """Qwen2 with random weights, saved in bf16 with the tokenizer; returns its size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    shape = {**QWEN2_5_0_5B, **(TINY_SHAPE if TINY else {})}
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 0.5B parameters on the GPU takes a second
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": params, "config": shape}


def write_data(folder: Path, rows: int) -> dict[str, Path]:
    """Fine-tuning rows (every 5th harmful, flagged), a refusal safe set, eval prompts."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)

    def words(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k))

    finetune = []
    for i in range(rows):
        harmful = i % 5 == 0
        finetune.append({
            "instruction": f"how do i make a bomb {words(8)}" if harmful else words(20),
            "output": f"steal a weapon {words(10)}" if harmful else words(30),
            "flag": "unsafe" if harmful else "safe"})
    safe = [{"prompt": f"how do i hack {words(6)}", "completion": f"sorry, I cannot help {i}"}
            for i in range(64)]
    prompts = [{"prompt": f"how do i make a weapon {words(5)}"} for _ in range(32)]
    paths = {"finetune": folder / "finetune.jsonl", "safe": folder / "safe.jsonl",
             "prompts": folder / "prompts.jsonl"}
    for name, data in (("finetune", finetune), ("safe", safe), ("prompts", prompts)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


def run(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """Run one stage; its output goes to OUT/logs/NAME.log. Returns status and wall time."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{name}.log"
    print(f"[gpu_check] {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: exit {code} in {wall} s", flush=True)
    if code != 0:
        print(log.read_text()[-3000:], flush=True)
    return {"exit": code, "wall_s": wall}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_commands(model: str, data: dict[str, Path], out: Path, sizes: dict) -> dict:
    sealft = [sys.executable, "-m", "sealft"]
    common = ["--model", model, "--dtype", "bfloat16", "--max-length", str(sizes["max_length"]),
              "--batch-size", str(sizes["batch"]), "--micro-batch-size", str(sizes["micro"]),
              "--epochs", "1", "--overwrite", "--no-show-progress"]
    select = [*sealft, "select", *common, "--finetune-data", str(data["finetune"]),
              "--safe-data", str(data["safe"]), "--keep-ratio", "0.8", "--label-field", "flag"]
    return {
        "select_alg1": [*select, "--algorithm", "penalty", "--output-dir", str(out / "alg1")],
        "select_alg2": [*select, "--algorithm", "memory-efficient",
                        "--output-dir", str(out / "alg2")],
        "finetune": [*sealft, "finetune", *common, "--data", str(out / "alg2" / "selected.jsonl"),
                     "--output-dir", str(out / "finetune")],
        "evaluate": [*sealft, "evaluate", "--model", model, "--dtype", "bfloat16",
                     "--adapter", str(out / "finetune"), "--suite", "custom",
                     "--prompt-files", f"check={data['prompts']}", "--max-new-tokens",
                     str(sizes["new_tokens"]), "--batch-size", "16", "--output-dir",
                     str(out / "evaluate"), "--overwrite"],
        "step_cost": [sys.executable, str(REPO / "benchmarks" / "step_cost.py"), "--models",
                      model, "--dtype", "bfloat16", "--steps", str(sizes["cost_steps"]),
                      "--batch", str(sizes["batch"]), "--micro", str(sizes["micro"])],
    }


def summarise(runs: Path, out: Path, stages: dict, model_info: dict) -> dict:
    import torch

    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "tiny": TINY, "model": model_info, "stages": stages}
    for name, folder in (("select_alg1", "alg1"), ("select_alg2", "alg2"),
                         ("finetune", "finetune")):
        summary = read_json(runs / folder / "summary.json")
        (out / "summaries").mkdir(exist_ok=True)
        (out / "summaries" / f"{name}.json").write_text(json.dumps(summary, indent=2))
        stages[name].update({k: summary.get(k) for k in (
            "steps", "train_seconds", "wall_seconds", "peak_memory_mb", "kept", "usable")})
        if "labels" in summary:
            stages[name]["auroc_unsafe_low_weight"] = summary["labels"].get(
                "auroc_unsafe_low_weight")
    metrics = read_json(runs / "evaluate" / "metrics.json")
    if metrics:
        (out / "summaries" / "evaluate.json").write_text(json.dumps(metrics, indent=2))
        stages["evaluate"]["timing"] = metrics.get("timing")
    return result


def markdown(result: dict) -> str:
    lines = [f"# GPU check on {result['device']} (torch {result['torch']})", "",
             f"Qwen2.5-0.5B architecture, random weights, {result['model']['parameters']:,} "
             f"parameters, bf16{' (TINY config)' if result['tiny'] else ''}.", "",
             "Peak memory: torch.cuda.max_memory_allocated on CUDA; peak RSS on CPU.", "",
             "| stage | exit | wall s | steps | train s | peak memory MB |",
             "|---|---|---|---|---|---|"]
    for name, stage in result["stages"].items():
        timing = stage.get("timing") or {}
        peak = stage.get("peak_memory_mb", timing.get("peak_memory_mb"))
        lines.append(f"| {name} | {stage['exit']} | {stage['wall_s']} | {stage.get('steps', '')} "
                     f"| {stage.get('train_seconds', '')} | {peak if peak is not None else ''} |")
    cost = result.get("step_cost_table")
    if cost:
        lines += ["", "step_cost.py:", "", *cost]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    parser.add_argument("--rows", type=int, default=64 if TINY else 512)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SEALFT_CACHE", str(work / "cache"))
    sizes = ({"max_length": 128, "batch": 8, "micro": 4, "new_tokens": 8, "cost_steps": 1}
             if TINY else
             {"max_length": 256, "batch": 32, "micro": 16, "new_tokens": 32, "cost_steps": 5})
    started = time.perf_counter()
    model = work / "qwen2.5-0.5b-random"
    model_info = build_model(model)
    print(f"[gpu_check] model: {model_info['parameters']:,} parameters in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    data = write_data(work / "data", args.rows)
    stages = {}
    for name, command in stage_commands(str(model), data, work / "runs", sizes).items():
        stages[name] = run(name, command, out, timeout=STAGE_TIMEOUT)
    result = summarise(work / "runs", out, stages, model_info)
    cost_log = (out / "logs" / "step_cost.log").read_text()
    result["step_cost_table"] = [line for line in cost_log.splitlines() if line.startswith("|")]
    result["total_s"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    print(f"[gpu_check] total {result['total_s']} s; results in {out}")
    failed = [name for name, stage in stages.items() if stage["exit"] != 0]
    if failed:
        sys.exit(f"gpu_check: failed stages: {', '.join(failed)}")


if __name__ == "__main__":
    main()
