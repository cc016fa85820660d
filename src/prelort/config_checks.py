"""The value checks every config section's ``validate`` uses (``prelort.config_sections``).

Each raises ``ConfigError`` with one line naming the key, the value and what it must be.
Private to the config modules (hence the underscores); imports nothing but ``prelort.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prelort.errors import ConfigError

_INT_MAX = 2**63 - 1  # TOML integers are 64-bit; so are the seeds torch and numpy take


def _choice(key: str, value: object, choices: Sequence[object]) -> None:
    """``value`` is one of ``choices`` (a ``Literal``'s or a registry's)."""
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")


def _int_at_least(key: str, value: int, lo: int, hint: str = "") -> None:
    """``value`` is an integer in [lo, 2^63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _INT_MAX:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{key} = {value!r} must be {what}{'; ' + hint if hint else ''}")


def _seed(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
        raise ConfigError(f"{key} = {value!r} must be an integer in 0..2^63-1")


def _real(
    key: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite number in the interval given by lo/hi (open or closed ends)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if lo is not None and hi is not None:
            where = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            where = f"{'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            where = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            where = ""
        what = f"a finite number {where}".rstrip()
        raise ConfigError(f"{key} = {value!r} must be {what}{'; ' + hint if hint else ''}")


def _scale_options(grad_accum: int, lr_schedule: str, warmup_steps: int, autocast: str) -> None:
    """[train]'s accumulation, schedule and precision keys (``TrainSection.validate``)."""
    _int_at_least("train.grad_accum", grad_accum, 1, hint="1: no gradient accumulation")
    _int_at_least("train.warmup_steps", warmup_steps, 0, hint="0: no warm-up")
    _choice("train.lr_schedule", lr_schedule, ("constant", "linear", "cosine"))
    _choice("train.autocast", autocast, ("none", "bf16", "fp16"))
