"""The default LoRA target modules of a causal LM: its attention query and value projections."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prelort.models.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["default_target_modules"]

# Attention query/value projections per ``config.model_type`` (the LoRA paper's choice).
_QV = ("q_proj", "v_proj")
_QV_MODEL_TYPES = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "olmo",
    "olmo2",
    "granite",
    "starcoder2",
    "stablelm",
    "phi",
    "gptj",
    "gpt_neo",
    "opt",
    "smollm3",
    "cohere",
]
_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_QV_MODEL_TYPES, _QV),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),  # fused qkv; GPT-2's is a Conv1D
    **dict.fromkeys(("gpt_neox", "bloom", "falcon"), ("query_key_value",)),
    **dict.fromkeys(("phi3", "codegen"), ("qkv_proj",)),
    "mpt": ("Wqkv",),
}

# Structural fallback when the model type is unknown: the first group present wins.
_FALLBACK_GROUPS: tuple[tuple[str, ...], ...] = (
    _QV,
    ("c_attn",),
    ("query_key_value",),
    ("qkv_proj",),
    ("Wqkv",),
    ("query", "value"),
)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Module-name suffixes to adapt by default: the attention query and value projections.

    Chosen from ``model.config.model_type`` (e.g. ``["q_proj", "v_proj"]`` for LLaMA and
    Gemma-3, ``["c_attn"]`` for GPT-2), checked against the model's own module names; for
    unknown types the first known projection naming found in the model is used.
    """
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates: list[tuple[str, ...]] = []
    if isinstance(model_type, str) and model_type in _TARGETS_BY_MODEL_TYPE:
        candidates.append(_TARGETS_BY_MODEL_TYPE[model_type])
    candidates.extend(_FALLBACK_GROUPS)
    for group in candidates:
        if all(target in leaf_names for target in group):
            return list(group)
    raise ModelLoadError(
        f"no default LoRA target modules for model type '{model_type}': "
        "set lora.target_modules in the config to the attention projection names"
    )
