"""Write a rank-r adapter in PEFT's own format (``PeftModel.from_pretrained`` loads it).

PEFT computes y = W x + (lora_alpha / r) B A x, so a PreLort adapter with scale s(r) is
exported with ``lora_alpha = s(r) * r`` (``use_rslora`` off) and weights saved under
PEFT's keys ``base_model.model.<module>.lora_{A,B}.weight``. ``target_modules`` are the
module-name suffixes (``["q_proj", "v_proj"]``), as a PEFT user writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from prelort.adapters.state import Adapter, adapter_rank

BASE_MODEL_HUB_IDS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m-it",
}
"""The Hugging Face hub model each built-in alias (``prelort.models.BUILTIN_MODELS``) is a
GGUF quantisation of: exported adapters name it as ``base_model_name_or_path``."""


def base_model_id(name: str) -> str:
    """The hub id of a built-in model alias, else ``name`` unchanged (a folder or a hub id)."""
    return BASE_MODEL_HUB_IDS.get(name, name)


def short_target_modules(names: Sequence[str]) -> list[str]:
    """The sorted last components of module names: ``model.layers.0.self_attn.q_proj`` -> ``q_proj``."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _matches(name: str, target: str) -> bool:  # PEFT's rule for a list of target_modules
    return name == target or name.endswith("." + target)


def export_peft_adapter(
    adapter: Adapter,
    scale: float,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: Sequence[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``adapter`` (one rank r for every module) with scale ``scale`` to ``out_dir``.

    ``target_modules`` (default: the suffixes of the adapter's module names) must select
    every module of the adapter; ``metadata`` goes into the safetensors header next to
    ``format = "pt"``.
    """
    from peft import LoraConfig
    from safetensors.torch import save

    from prelort.atomic_files import atomic_write_bytes

    r = adapter_rank(adapter)
    targets = sorted(target_modules) if target_modules else short_target_modules(list(adapter))
    unmatched = [n for n in adapter if not any(_matches(n, t) for t in targets)]
    if unmatched:
        raise ValueError(f"target_modules {targets} do not select the adapter's modules {unmatched[:3]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=r,
        lora_alpha=scale * r,  # type: ignore[arg-type]  # PEFT accepts floats
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM" if base_model_name_or_path else None,
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(out))
    tensors: dict[str, torch.Tensor] = {}
    for name, pair in adapter.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = pair.A.detach().contiguous().float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = pair.B.detach().contiguous().float()
    meta = {"format": "pt", **(metadata or {})}
    atomic_write_bytes(out / "adapter_model.safetensors", save(tensors, metadata=meta))
    return out
