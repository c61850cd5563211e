"""Plumbing every stage shares: the Accelerate process state and accelerator, gradient sync,
logging and memory. Kept apart from the stages so that no stage imports another (fine-tuning
does not need selection's modules to get an accelerator)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sealft.errors import ConfigError
from sealft.models import LoraSettings

# Set by `accelerate launch` from the config file's distributed_type.
_REQUESTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def process_state():
    """Accelerate's view of the processes. On machines without an accelerator, `cpu=True` is
    what makes `torchrun` / `accelerate launch` run as MULTI_CPU (gloo) instead of silently
    running N independent single-process jobs."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        _refuse_sharded_launch_on_cpu()
    return PartialState(cpu=cpu)


def _refuse_sharded_launch_on_cpu() -> None:
    """On CPU, Accelerate turns an FSDP or DeepSpeed launch config into plain data parallel
    (MULTI_CPU) without a word (measured with accelerate 1.15). Refuse rather than let a user
    believe the model is sharded. (On GPUs the engine is set later, by the Accelerator.)"""
    for variable, engine in _REQUESTED_ENGINES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise ConfigError(
                f"the launch asked for {engine} ({variable}), but without a GPU Accelerate "
                "would run plain data parallel instead; launch with configs/accelerate/ddp.yaml "
                f"(or torchrun) for data parallel on CPU, or use GPUs for {engine}")


def make_accelerator(out: Path, log: bool = True):
    from accelerate import Accelerator

    try:
        import tensorboard  # noqa: F401

        trackers = "tensorboard" if log else None
    except ImportError:
        trackers = None
    process_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers,
                              project_dir=str(out / "logs"))
    if trackers:
        accelerator.init_trackers("sealft")
    return accelerator


def gradient_sync(accelerator):
    """Sum gradients over processes. Each process divides its losses by the *global* batch
    size, so the sum is the full-batch gradient on every rank: θ, θ' and the selector logits
    stay identical everywhere. Done with Accelerate's collective rather than a DDP wrapper
    because a step alternates two adapters on one model, which DDP's one-forward-one-backward
    bookkeeping does not express."""
    if accelerator.num_processes == 1:
        return lambda params: None

    def sync(params: list[torch.nn.Parameter]) -> None:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = accelerator.reduce(param.grad, reduction="sum")

    return sync


def sharding_engine(accelerator) -> str | None:
    """The engine name ("FSDP", "DEEPSPEED") when the launch shards the model, else None."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    return kind.value if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) else None


def require_data_parallel(accelerator) -> None:
    """Selection replicates the model on every process (see `gradient_sync`); an FSDP or
    DeepSpeed launch would be silently ignored, so it is refused."""
    engine = sharding_engine(accelerator)
    if engine:
        raise ConfigError(
            f"sealft select runs data-parallel only, not under "
            f"{engine}: launch it with configs/accelerate/ddp.yaml "
            "(the model is replicated on each process); FSDP / DeepSpeed apply to `sealft finetune`")


def lora_settings(args) -> LoraSettings:
    return LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout,
                        tuple(args.lora_target_modules))


def finish_logging(accelerator) -> None:
    # Not accelerator.end_training(): it also tears down the process group, and the stage
    # still needs it to agree on outputs.
    for tracker in accelerator.trackers:
        tracker.finish()


def log_metrics(accelerator, metrics: dict[str, float], step: int) -> None:
    if accelerator.trackers:
        accelerator.log(metrics, step=step)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
