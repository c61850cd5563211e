"""Loop plumbing shared by selection and fine-tuning: data order, sharding across processes,
micro-batching, checkpoints, resume and logging. The maths lives in the step functions
(`bilevel.py`, `finetune.py`); this file never looks inside a step.

Data order is a pure function of (seed, epoch), so a checkpoint only needs the position in it;
resuming replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sealft.errors import TrainingError
from sealft.io import append_jsonl, atomic_write, record_output, write_json

CHECKPOINT = "checkpoint"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def split_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches; the last one may be smaller (no example is dropped)."""
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def shard(positions: list[int], rank: int, world: int) -> list[int]:
    return positions[rank::world]


def micro_batches(positions: list[int], size: int) -> list[list[int]]:
    return [positions[k:k + size] for k in range(0, len(positions), size)]


class Cycle:
    """Endless seeded passes over n items (the safe set). Unlike zipping two loaders, it never
    ends the epoch early when the safe set is the smaller one."""

    def __init__(self, n: int, seed: int, consumed: int = 0):
        self.n, self.seed, self.consumed = n, seed, consumed
        self._lap, self._order = -1, []

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            lap, offset = divmod(self.consumed, self.n)
            if lap != self._lap:
                self._order, self._lap = epoch_order(self.n, self.seed + 7919, lap), lap
            out.append(self._order[offset])
            self.consumed += 1
        return out


@dataclass
class LoopState:
    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    safe_consumed: int = 0
    elapsed: float = 0.0
    """Seconds of training before the last resume (wall time survives interruptions)."""


class CheckpointError(TrainingError):
    """A checkpoint file that cannot be read (truncated, corrupt, from another run)."""


def read_checkpoint_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)`, with any failure turned into an error that names the file."""
    try:
        return read(path)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, torch.load and json raise many types for bad files
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(f"checkpoint file {path} is unreadable ({reason})") from err


@dataclass
class Checkpoint:
    """Named groups of tensors (saved as safetensors) plus picklable-free optimiser states.

    The last two checkpoints are kept (`checkpoint/` and `checkpoint.prev/`): a latest one
    damaged on disk (truncated copy, full disk) leaves an older complete one to resume from."""

    directory: Path
    save_tensors: Callable[[Path], None]
    """Writes adapters / selector / optimiser states into the given folder."""
    load_tensors: Callable[[Path], None]
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, state: LoopState) -> None:
        final, prev = self.directory / CHECKPOINT, self.directory / f"{CHECKPOINT}.prev"
        tmp = self.directory / f"{CHECKPOINT}.tmp"
        record_output(self.directory, tmp.name, final.name, prev.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.save_tensors(tmp)
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {**state.__dict__, **self.extra})  # last: marks complete
        if final.exists():
            shutil.rmtree(prev, ignore_errors=True)
            final.rename(prev)
        tmp.rename(final)  # each switch is one rename: a kill leaves a complete checkpoint

    def candidates(self) -> list[Path]:
        """Checkpoint folders to try, newest first."""
        names = (CHECKPOINT, f"{CHECKPOINT}.prev")
        return [self.directory / n for n in names if (self.directory / n).is_dir()]

    def load(self) -> LoopState | None:
        """Restore the newest readable checkpoint; a damaged latest one falls back to the
        previous with a warning, and with no readable one the error names the bad file."""
        failures = []
        for folder in self.candidates():
            try:
                state = self._load_from(folder)
            except CheckpointError as err:
                failures.append(err)
                continue
            if failures:
                print(f"sealft: warning: {failures[0]}; resuming from the previous checkpoint "
                      f"{folder} (step {state.global_step})", file=sys.stderr)
            return state
        if failures:
            raise CheckpointError(
                f"{failures[0]}; no earlier complete checkpoint to fall back to. Restart "
                "without --resume in a new --output-dir, or --overwrite this one"
            )
        return None

    def _load_from(self, folder: Path) -> LoopState:
        def read_state(path: Path) -> LoopState:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return LoopState(**{k: saved[k] for k in LoopState.__dataclass_fields__})

        state = read_checkpoint_file(folder / "state.json", read_state)
        rng = read_checkpoint_file(folder / "rng.pt",
                                   lambda p: torch.load(p, weights_only=True)["torch"])
        self.load_tensors(folder)
        torch.set_rng_state(rng)
        return state


def adapter_checkpoint(directory: Path, model, adapters: dict[str, str],
                       optimizers: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
                       ) -> Checkpoint:
    """A `Checkpoint` of LoRA adapters (adapter name -> file stem, safetensors), optimiser
    states (one torch file, read back with weights_only=True) and named tensors restored in
    place (the selector logits)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    optimizers = {k: o for k, o in optimizers.items() if o is not None}
    tensors = tensors or {}

    def save(folder: Path) -> None:
        for name, stem in adapters.items():
            state = get_peft_model_state_dict(model, adapter_name=name)
            save_file({k: v.contiguous() for k, v in state.items()}, folder / f"{stem}.safetensors")
        if tensors:
            save_file({k: t.detach().contiguous() for k, t in tensors.items()},
                      folder / "tensors.safetensors")
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, folder / "optimizers.pt")

    def load(folder: Path) -> None:
        # Read every file before changing anything, so a bad file leaves the model untouched
        # for the fallback to the previous checkpoint.
        adapter_states = {name: read_checkpoint_file(folder / f"{stem}.safetensors", load_file)
                          for name, stem in adapters.items()}
        saved = read_checkpoint_file(folder / "tensors.safetensors", load_file) if tensors else {}
        states = read_checkpoint_file(folder / "optimizers.pt",
                                      lambda p: torch.load(p, weights_only=True))
        try:
            for name, state in adapter_states.items():
                set_peft_model_state_dict(model, state, adapter_name=name)
            with torch.no_grad():
                for key, tensor in tensors.items():
                    tensor.copy_(saved[key])
            for key, optimizer in optimizers.items():
                optimizer.load_state_dict(states[key])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {folder} does not fit this run ({' '.join(str(err).split())[:160]})"
            ) from err

    return Checkpoint(directory, save, load)


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    micro_batch_size: int
    safe_batch_size: int
    seed: int
    save_every: int
    rank: int = 0
    world: int = 1
    show_progress: bool = True


StepFn = Callable[[list[list[int]], list[list[int]], float, list[int], int], dict[str, float]]


def train_loop(
    n_examples: int,
    n_safe: int,
    settings: LoopSettings,
    step: StepFn,
    metrics_path: Path,
    checkpoint: Checkpoint | None,
    resume: bool,
    describe: Callable[[list[int]], str] = str,
    log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
) -> LoopState:
    """Run `epochs` passes. `step(ft_micro, safe_micro, epoch_progress, batch, safe_total)`
    gets this process's micro-batches (positions), the whole batch across processes (to
    average by its size, and for state every rank must update alike) and the safe batch size."""
    state = LoopState()
    if resume and checkpoint is not None:
        state = checkpoint.load() or state
        _truncate_metrics(metrics_path, state.global_step)
    safe = Cycle(n_safe, settings.seed, state.safe_consumed) if n_safe else None
    steps_per_epoch = math.ceil(n_examples / settings.batch_size)
    bar = tqdm(total=steps_per_epoch * settings.epochs, initial=state.global_step,
               disable=not settings.show_progress or settings.rank != 0, desc="training")
    started = time.perf_counter() - state.elapsed
    while state.epoch < settings.epochs:
        batches = split_batches(epoch_order(n_examples, settings.seed, state.epoch),
                                settings.batch_size)
        while state.batch_in_epoch < len(batches):
            batch = batches[state.batch_in_epoch]
            safe_batch = safe.take(settings.safe_batch_size) if safe else []
            mine = shard(batch, settings.rank, settings.world)
            mine_safe = shard(safe_batch, settings.rank, settings.world)
            progress = state.epoch + state.batch_in_epoch / len(batches)
            t0 = time.perf_counter()
            metrics = step(micro_batches(mine, settings.micro_batch_size),
                           micro_batches(mine_safe, settings.micro_batch_size),
                           progress, batch, len(safe_batch))
            if not all(math.isfinite(v) for v in metrics.values()):
                raise TrainingError(
                    f"non-finite loss at step {state.global_step + 1} (epoch {state.epoch}, "
                    f"batch {state.batch_in_epoch}; examples {describe(batch)}): {metrics}. "
                    "Lower the learning rate or check those examples; the last checkpoint "
                    "is kept, resume with --resume"
                )
            state.batch_in_epoch += 1
            state.global_step += 1
            state.safe_consumed = safe.consumed if safe else 0
            state.elapsed = time.perf_counter() - started
            record = {"step": state.global_step, "epoch": round(progress, 4), **metrics,
                      "seconds": round(time.perf_counter() - t0, 4)}
            if settings.rank == 0:
                append_jsonl(metrics_path, record)
                log(metrics, state.global_step)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
            end_of_epoch = state.batch_in_epoch == len(batches)
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            due = settings.save_every and state.global_step % settings.save_every == 0
            if checkpoint is not None and settings.rank == 0 and (due or end_of_epoch):
                checkpoint.save(state)
            if end_of_epoch:
                break
    bar.close()
    return state


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line from the kill
    with atomic_write(path) as handle:
        handle.write("".join(k + "\n" for k in keep))
