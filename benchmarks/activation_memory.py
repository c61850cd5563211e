"""Where a training step's memory goes: the peak added by one forward + backward of the
per-example loss (LoRA on the frozen base), by rows × tokens, with and without gradient
checkpointing. Each configuration runs in its own process (peak RSS on CPU, peak allocated
memory on CUDA).

    python benchmarks/activation_memory.py                         # SmolLM2-135M-Instruct
    python benchmarks/activation_memory.py --rows 8 16 --length 192

Why it matters: the demo's DPO upper level runs chosen + rejected of a micro-batch of pairs in
one graph, i.e. twice the micro-batch in sequences; their activations, not the model or the
selector, set its peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from sealft.runtime import peak_memory_mb


def measure(model_name: str, rows: int, length: int, checkpointing: bool) -> dict:
    from sealft.losses import per_example_loss
    from sealft.models import LoraSettings, add_lora_adapters, load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_name)
    if torch.cuda.is_available():
        model = model.cuda()
    model = add_lora_adapters(model, LoraSettings(), ("theta",), checkpointing)
    model.train()
    loaded = peak_memory_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # half prompt, half response
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    per_example_loss(model, batch).sum().backward()
    return {"loaded_mb": loaded, "added_mb": peak_memory_mb() - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, *args.child, args.checkpointing)))
        return
    print(f"\n{args.model}, LoRA r16 q/v, one forward + backward of the per-example loss, "
          f"half of each row supervised\n")
    print("| rows × tokens | gradient checkpointing | model loaded MB | step adds MB |")
    print("|---|---|---|---|")
    for rows in args.rows:
        for checkpointing in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--child", str(rows),
                 str(args.length), *(["--checkpointing"] if checkpointing else [])],
                capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {rows} × {args.length} | {'on' if checkpointing else 'off'} "
                  f"| {r['loaded_mb']:.0f} | {r['added_mb']:.0f} |")


if __name__ == "__main__":
    main()
