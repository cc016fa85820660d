"""Write a rank-r adapter in PEFT's own format (``PeftModel.from_pretrained`` loads it).

PEFT computes y = W x + (lora_alpha / r) B A x, so a PreLort adapter with scale s(r) is
exported with ``lora_alpha = s(r) * r`` (``use_rslora`` off) and weights saved under
PEFT's keys ``base_model.model.<module>.lora_{A,B}.weight``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prelort.adapters.state import Adapter, adapter_rank


def export_peft_adapter(
    adapter: Adapter,
    scale: float,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save ``adapter`` (one rank r for every module) with scale ``scale`` to ``out_dir``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = adapter_rank(adapter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=r,
        lora_alpha=scale * r,  # type: ignore[arg-type]  # PEFT accepts floats
        target_modules=sorted(adapter),
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
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
