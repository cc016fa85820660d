"""Shared helpers of the benchmark scripts: machine description, models, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_lm(
    name: str = "smollm2-135m", *, random_init: bool = False, dtype: str = "auto", device: str = "auto"
) -> tuple[torch.nn.Module, Any]:
    """A real pretrained model through PreLort's loader, or (``random_init``) a randomly
    initialised model of the same architecture built from its config (for machines without
    the weights: only speed is measured then)."""
    from prelort.models import load_causal_lm
    from prelort.models.loading import resolve_dtype_device

    if not random_init:
        return load_causal_lm(name, dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(name)
    if not folder.is_dir():
        from prelort.models import ensure_cached

        folder = ensure_cached(name)
    torch_dtype, torch_device = resolve_dtype_device(dtype, device)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).to(torch_device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, None


def median_time(fn: Callable[[], Any], reps: int, *, sync: bool = False) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``reps`` calls (CUDA synchronised when asked)."""
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
