"""Loading frozen Hugging Face causal LMs: built-in GGUF aliases, local folders, hub ids."""

from prelort.models.loading import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelLoadError,
    default_target_modules,
    ensure_cached,
    load_causal_lm,
    resolve_cache_dir,
    resolve_dtype_device,
)

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ModelLoadError",
    "default_target_modules",
    "ensure_cached",
    "load_causal_lm",
    "resolve_cache_dir",
    "resolve_dtype_device",
]
