"""Loading frozen Hugging Face causal LMs: built-in GGUF aliases, local folders, hub ids."""

from prelort.models.builtins import BUILTIN_MODELS, BuiltinModel
from prelort.models.errors import ModelLoadError
from prelort.models.loading import ensure_cached, load_causal_lm, resolve_cache_dir, resolve_dtype_device
from prelort.models.targets import default_target_modules

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
