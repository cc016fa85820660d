"""One export for every rank: per-level PEFT adapters plus the rank-R adapter that serves any rank.

``export_all_levels`` writes a folder that PEFT loads as several named adapters::

    DIR/adapter_config.json, DIR/adapter_model.safetensors    the rank-R adapter
    DIR/r2/, DIR/r4/, ...                                     one PEFT adapter per level
    DIR/README.md                                             model card

The rank-R adapter stays at the top level, so ``PeftModel.from_pretrained(base, DIR)`` gives
the full model; ``load_adapter(DIR + "/r4", adapter_name="r4")`` adds a level. Its
safetensors header holds one ``prelort`` entry (JSON, ``read_record``): the levels and the
*prefix scaling* ``{kind, alpha, max_rank}``, the Scaling s with which its first r rank
dimensions at scale s(r) are the run's rank-r model (the run's ``[lora]`` scaling, or
``fixed`` for rules such as FlexLoRA whose downlink rescales B by s(R) / s(r)). PEFT's
``adapter_config.json`` cannot carry it: PEFT warns about, and drops, keys it does not know.

``truncate`` serves rank r from the loaded rank-R adapter: A's rows [:r], B's columns [:r]
and scale s(r), in place or as a new named adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prelort.adapters.export import export_peft_adapter
from prelort.adapters.state import Adapter, Scaling

RECORD_KEY = "prelort"
RECORD_FORMAT = 1
WEIGHTS_FILE = "adapter_model.safetensors"


def level_dir_name(level: int) -> str:
    """The subfolder (and adapter name) of level ``level``: ``r4``."""
    return f"r{level}"


def _scaling_dict(s: Scaling) -> dict[str, Any]:
    return {"kind": s.kind, "alpha": float(s.alpha), "max_rank": int(s.max_rank)}


def prefix_scale(full: Adapter, level_adapter: Adapter, scale: float) -> float | None:
    """The scale at which the rank-r prefix of ``full`` computes ``level_adapter`` at ``scale``.

    None when ``level_adapter`` is not a (B-rescaled) prefix of ``full``. A prefix whose B is
    zero everywhere gives ``scale`` (any scale computes the same).
    """
    num = den = 0.0
    for name, pair in level_adapter.items():
        ref = full[name].truncate(pair.rank)
        if not torch.allclose(pair.A.double(), ref.A.double(), rtol=1e-6, atol=1e-8):
            return None
        num += float((pair.B.double() * ref.B.double()).sum())
        den += float((ref.B.double() ** 2).sum())
    if den == 0.0:
        return scale
    c = num / den
    for name, pair in level_adapter.items():
        ref = full[name].truncate(pair.rank)
        if not torch.allclose(pair.B.double(), c * ref.B.double(), rtol=1e-5, atol=1e-8):
            return None
    return c * scale


def resolve_prefix_scaling(level_scales: Mapping[int, float], run_scaling: Scaling) -> Scaling:
    """The Scaling that gives ``level_scales`` at every level: the run's, or a ``fixed`` one.

    Raises ValueError when neither does (the levels then cannot be served by truncation).
    """

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)

    if all(close(s, run_scaling(r)) for r, s in level_scales.items()):
        return run_scaling
    top = level_scales[max(level_scales)]
    if all(close(s, top) for s in level_scales.values()):
        R = run_scaling.max_rank
        return Scaling("fixed", top * R, R)
    raise ValueError(f"the level scales {dict(level_scales)} follow no scaling rule")


def export_all_levels(
    full: Adapter,
    levels: Mapping[int, tuple[Adapter, float]],
    run_scaling: Scaling,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: Sequence[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the rank-R adapter ``full`` to ``out_dir`` and ``levels[l] = (adapter, s(l))`` to
    ``out_dir/r{l}``; ``info`` (method, base model, ...) joins the recorded metadata.

    Raises ValueError when a level's adapter is not a prefix of ``full`` (B may be rescaled).
    Returns ``out_dir``; the model card is the caller's (``model_card``).
    """
    R = max(levels)
    full_scale = levels[R][1]
    scales: dict[int, float] = {}
    for lv, (ad, s) in sorted(levels.items()):
        eff = prefix_scale(full, ad, s)
        if eff is None:
            raise ValueError(f"the rank-{lv} adapter is not the rank-{lv} prefix of the rank-{R} adapter")
        scales[lv] = eff
    prefix = resolve_prefix_scaling(scales, run_scaling)
    common = {"format": RECORD_FORMAT, "levels": sorted(levels), **dict(info or {})}
    record = {
        **common,
        "rank": R,
        "scaling": _scaling_dict(prefix),
        "run_scaling": _scaling_dict(run_scaling),
        "level_scales": {str(lv): s for lv, s in sorted(scales.items())},
    }
    kw: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": target_modules,
    }
    out = Path(out_dir)
    export_peft_adapter(
        full, full_scale, out, metadata={RECORD_KEY: json.dumps(record, sort_keys=True)}, **kw
    )
    for lv, (ad, s) in sorted(levels.items()):
        meta = {**common, "rank": lv, "level": lv, "scale": s}
        export_peft_adapter(
            ad, s, out / level_dir_name(lv), metadata={RECORD_KEY: json.dumps(meta, sort_keys=True)}, **kw
        )
    return out


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``prelort`` metadata of an exported adapter (a folder or its safetensors file)."""
    from safetensors import safe_open

    p = Path(path)
    weights = p / WEIGHTS_FILE if p.is_dir() else p
    with safe_open(str(weights), framework="pt") as f:  # type: ignore[no-untyped-call]
        meta = dict(f.metadata() or {})
    if RECORD_KEY not in meta:
        raise ValueError(f"{weights}: no PreLort record (not written by `prelort export --all-levels`)")
    record: dict[str, Any] = json.loads(meta[RECORD_KEY])
    return record


def _as_scaling(scaling: Scaling | Mapping[str, Any] | str | os.PathLike[str]) -> Scaling:
    if isinstance(scaling, Scaling):
        return scaling
    if isinstance(scaling, str | os.PathLike):
        record = read_record(scaling)
        if "scaling" not in record:
            raise ValueError(f"{scaling}: a level adapter; pass the folder of the rank-R adapter")
        scaling = record["scaling"]
    assert isinstance(scaling, Mapping)
    return Scaling(scaling["kind"], float(scaling["alpha"]), int(scaling["max_rank"]))


def load_all_levels(model: Any, folder: str | Path, **kwargs: Any) -> Any:
    """``model`` with every adapter of an ``export --all-levels`` folder (PEFT ``PeftModel``).

    The rank-R adapter is ``"default"`` (active), each level ``"r{l}"``; the recorded prefix
    scaling is kept on the model, so ``truncate(model, r)`` needs no ``scaling``.
    ``kwargs`` go to ``PeftModel.from_pretrained`` / ``load_adapter``.
    """
    from peft import PeftModel

    folder = Path(folder)
    record = read_record(folder)
    peft_model = PeftModel.from_pretrained(model, str(folder), **kwargs)
    for lv in record["levels"]:
        name = level_dir_name(int(lv))
        peft_model.load_adapter(str(folder / name), adapter_name=name, **kwargs)
    peft_model.prelort_scaling = {"default": _as_scaling(record["scaling"])}  # type: ignore[assignment]
    return peft_model


def truncate(
    peft_model: Any,
    r: int,
    adapter_name: str = "default",
    *,
    scaling: Scaling | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    new_adapter_name: str | None = None,
) -> Any:
    """Serve rank ``r`` from a loaded rank-R PEFT LoRA adapter; returns ``peft_model``.

    Keeps lora_A's rows [:r] and lora_B's columns [:r] of ``adapter_name`` and sets its scale
    to s(r), so the model computes exactly the rank-r adapter of the export. s comes from
    ``scaling``: a ``Scaling``, its dict ``{kind, alpha, max_rank}``, or the export folder
    (its recorded prefix scaling); by default the one ``load_all_levels`` recorded. For
    ``fixed`` scaling s(r) = alpha / R at every r.

    Without ``new_adapter_name`` the adapter is modified **in place** (the dimensions >= r are
    dropped). With it, a new adapter of that name is added holding the rank-r copy, and
    ``adapter_name`` is left unchanged (activate it with ``peft_model.set_adapter``).
    """
    from peft.tuners.lora import LoraLayer
    from torch import nn

    if scaling is None:
        scaling = getattr(peft_model, "prelort_scaling", {}).get(adapter_name)
        if scaling is None:
            raise ValueError(
                f"adapter {adapter_name!r} has no recorded scaling; pass scaling=<the export folder> "
                "or load it with prelort.adapters.load_all_levels"
            )
    s = _as_scaling(scaling)
    config = peft_model.peft_config[adapter_name]
    R = int(config.r)
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"adapter {adapter_name!r} has a rank/alpha pattern; truncate needs one rank")
    if not 0 < r <= R:
        raise ValueError(f"cannot truncate the rank-{R} adapter {adapter_name!r} to rank {r}")
    scale = s(r)
    alpha = scale * (math.sqrt(r) if config.use_rslora else r)  # PEFT's own formula gives `scale`
    target = adapter_name
    if new_adapter_name is not None:
        import copy

        new_config = copy.deepcopy(config)
        new_config.r, new_config.lora_alpha = r, alpha
        peft_model.add_adapter(new_adapter_name, new_config)
        target = new_adapter_name
    else:
        config.r, config.lora_alpha = r, alpha
    layers: list[Any] = [
        m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
    ]
    if not layers:
        raise ValueError(f"no LoRA layer holds adapter {adapter_name!r}")
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first")
    with torch.no_grad():
        for layer in layers:
            A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            if not isinstance(A, nn.Linear) or not isinstance(B, nn.Linear) or A.weight.shape[0] != R:
                raise ValueError(f"truncate handles rank-{R} linear LoRA layers only, got {type(layer)}")
            a_w, b_w = A.weight[:r].clone(), B.weight[:, :r].clone()
            newA, newB = layer.lora_A[target], layer.lora_B[target]
            grad = A.weight.requires_grad if target == adapter_name else newA.weight.requires_grad
            newA.weight = nn.Parameter(a_w, requires_grad=grad)
            newB.weight = nn.Parameter(b_w, requires_grad=grad)
            if target != adapter_name and B.bias is not None and newB.bias is not None:
                newB.bias.copy_(B.bias)
            newA.out_features = newB.in_features = r
            layer.r[target] = r
            layer.lora_alpha[target] = alpha
            layer.scaling[target] = scale
    if not hasattr(peft_model, "prelort_scaling"):
        peft_model.prelort_scaling = {}
    peft_model.prelort_scaling[target] = s
    return peft_model


def model_card(
    *,
    method: str,
    summary: str,
    levels: Sequence[int],
    scaling: Mapping[str, Any],
    base_model: str | None,
    per_rank: Mapping[str, Mapping[str, Any]] | None,
    notes: Sequence[str] = (),
) -> str:
    """The README.md of an ``export --all-levels`` folder: method, levels, base model, metrics."""
    R = max(levels)
    example = next((r for r in range(1, R + 1) if r not in levels), levels[0])
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- lora", "- peft", "- federated-learning", "- prelort", "---", ""]
    lines += [
        f"# PreLort adapter: {method}, ranks {', '.join(str(lv) for lv in levels)}",
        "",
        f"Federated heterogeneous-rank LoRA trained with PreLort, method `{method}`"
        + (f" ({summary})." if summary else "."),
        "",
        f"- **Base model**: `{base_model or 'not recorded (synthetic workload)'}`",
        f"- **Levels**: {', '.join(str(lv) for lv in levels)} (the rank-{R} adapter is at the top level)",
        f"- **Scaling**: `{scaling['kind']}`, alpha = {scaling['alpha']:g}, R = {scaling['max_rank']}: "
        "the first r rank dimensions at scale s(r) are the rank-r adapter "
        "(fixed: s(r) = alpha / R; per_rank: alpha / r; rslora: alpha / sqrt(r))",
        *[f"- {n}" for n in notes],
        "",
        "## Files",
        "",
        f"- `adapter_config.json`, `adapter_model.safetensors`: the rank-{R} adapter; its safetensors "
        "header entry `prelort` (JSON) records the levels and the scaling",
        *[f"- `{level_dir_name(lv)}/`: the rank-{lv} adapter (a PEFT adapter folder)" for lv in levels],
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from prelort.adapters import load_all_levels, truncate",
        "",
        f'model = PeftModel.from_pretrained(base, "DIR")                      # rank {R}',
        f'model.load_adapter("DIR/{level_dir_name(levels[0])}", adapter_name="{level_dir_name(levels[0])}")'
        f"  # rank {levels[0]}",
        "# or every level at once, then any rank r from the full adapter:",
        'model = load_all_levels(base, "DIR")',
        f'truncate(model, {example}, new_adapter_name="r{example}"); model.set_adapter("r{example}")',
        "```",
        "",
        "## Final metrics per rank",
        "",
    ]
    if not per_rank:
        lines.append("No results.json was found for this run.")
    else:
        keys = sorted({k for m in per_rank.values() for k in m})
        lines.append("| rank | " + " | ".join(keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for rank in sorted(per_rank, key=lambda x: int(x) if str(x).isdigit() else 0):
            m = per_rank[rank]
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), int | float) else str(m.get(k, "")) for k in keys]
            lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
