"""Read, check and load a PEFT LoRA adapter folder (``prelort eval --adapter``).

A folder written by ``prelort export`` (or by PEFT itself) holds ``adapter_config.json`` and
``adapter_model.safetensors``. Damage, or an adapter made for another model, is one
``UserError`` line naming the file and what to do, never a PEFT traceback or a silently
untrained module. ``adapter_model.bin`` is never read: unpickling can run code.

PEFT is imported only by ``load_peft_adapter``: a damaged folder fails before that cost.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prelort.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FIX = "export it again with `prelort export`"
"""What every error about a damaged adapter tells the user to do."""

_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def read_peft_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)``: ``adapter_config.json`` and the weights of a PEFT LoRA folder.

    Checks what can be checked without a model: the folder and both files exist, the config
    is a JSON object with ``peft_type`` ``"LORA"``, a positive integer ``r``, a finite
    ``lora_alpha`` and ``target_modules`` a name or a list of names, and the safetensors file
    is readable. Raises ``UserError`` (one line) otherwise.
    """
    if not adapter_dir.is_dir():
        raise UserError(f"--adapter {adapter_dir}: not a folder; pass a PEFT adapter folder")
    conf_path = adapter_dir / CONFIG_FILE
    if not conf_path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no {CONFIG_FILE}); {FIX}")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{conf_path}: not valid JSON ({exc}); {FIX}") from None
    if not isinstance(conf, dict):
        raise UserError(f"{conf_path}: holds a {type(conf).__name__}, not an object; {FIX}")
    if conf.get("peft_type") != "LORA":
        raise UserError(f"{conf_path}: peft_type {conf.get('peft_type')!r} is not 'LORA'; {FIX}")
    r, alpha, targets = conf.get("r"), conf.get("lora_alpha"), conf.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{conf_path}: r = {r!r} is not a positive integer; {FIX}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise UserError(f"{conf_path}: lora_alpha = {alpha!r} is not a finite number; {FIX}")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise UserError(f"{conf_path}: target_modules = {targets!r:.60} is not a list of names; {FIX}")
    return conf, _read_weights(adapter_dir)


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        other = " (adapter_model.bin is not read: pickles can run code)" if pickled else ""
        raise UserError(f"{adapter_dir}: no {WEIGHTS_FILE}, the adapter's weights{other}; {FIX}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: damaged weights file ({exc}); {FIX}") from None


def check_peft_adapter(
    adapter_dir: Path, conf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA factors ``{module: (A, B)}`` of an adapter read by ``read_peft_adapter``,
    after checking that they fit ``model``.

    A tensor that is not a LoRA factor or is for a module ``model`` has no linear layer for,
    NaN/Inf, a module with only one factor, shapes that do not fit the module's weight, or a
    rank other than ``r`` (without a ``rank_pattern``) is one ``UserError`` line.
    """
    weights = adapter_dir / WEIGHTS_FILE
    modules = dict(model.named_modules())
    found: dict[str, dict[str, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int]] = {}  # (out_features, in_features) of each module's weight
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise UserError(f"{weights}: unexpected tensor {key!r} (not a LoRA A/B weight); {FIX}")
        name, which = m.groups()
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UserError(
                f"{weights}: tensor {key!r} is for module {name!r}, which the run's model has no linear "
                "layer for; was the adapter made for another model?"
            )
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{weights}: tensor {key!r} holds NaN or Inf; {FIX}")
        found.setdefault(name, {})[which] = t
        shapes[name] = (weight.shape[0], weight.shape[1])
    if not found:
        raise UserError(f"{weights}: holds no LoRA weights; {FIX}")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: module {name!r} has lora_{''.join(ab)} only; {FIX}")
        out_f, in_f = shapes[name]
        A, B = ab["A"], ab["B"]
        if (
            A.dim() != 2
            or B.dim() != 2
            or A.shape[1] != in_f
            or B.shape[0] != out_f
            or A.shape[0] != B.shape[1]
        ):
            raise UserError(
                f"{weights}: module {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                f"which do not fit its weight {(out_f, in_f)}; was the adapter made for another model?"
            )
        if A.shape[0] != conf["r"] and not conf.get("rank_pattern"):
            raise UserError(
                f"{weights}: module {name!r} has rank {A.shape[0]} but {CONFIG_FILE} says r = "
                f"{conf['r']}; {FIX}"
            )
        pairs[name] = (A, B)
    return pairs


def load_peft_adapter(
    adapter_dir: Path, conf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module
) -> PeftModel:
    """``model`` wrapped by PEFT with the adapter of ``adapter_dir``, after ``check_peft_adapter``.

    ``conf`` and ``tensors`` are what ``read_peft_adapter(adapter_dir)`` returned. PEFT's own
    load errors, and ``target_modules`` that select other modules than the weights are for
    (PEFT would leave those untrained), are one ``UserError`` line.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pairs = check_peft_adapter(adapter_dir, conf, tensors, model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"{adapter_dir}: PEFT could not load the adapter ({type(exc).__name__}: {first}); {FIX}"
        ) from None
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    if wrapped != set(pairs):
        raise UserError(
            f"{adapter_dir / CONFIG_FILE}: target_modules select {sorted(wrapped)} but the weights "
            f"are for {sorted(pairs)}; {FIX}"
        )
    return peft_model
