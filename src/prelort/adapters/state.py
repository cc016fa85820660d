"""Adapter state as plain tensors: what travels between server and clients.

PEFT's layout: for a target module with weight W (m x n), A is (r x n) and B is (m x r),
and the adapter's weight change is dW_r = s(r) * B[:, :r] @ A[:r] (docs/design.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ScalingKind = Literal["fixed", "per_rank", "rslora"]
SCALING_KINDS: tuple[str, ...] = ("fixed", "per_rank", "rslora")


@dataclass(frozen=True)
class LoRAPair:
    """One module's LoRA factors: ``A`` (r, in_features) and ``B`` (out_features, r)."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(f"LoRA factors must be 2-D, got A{tuple(self.A.shape)} B{tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def truncate(self, r: int) -> LoRAPair:
        """The rank-r prefix ``(A[:r], B[:, :r])`` as views (no copy)."""
        if not 0 < r <= self.rank:
            raise ValueError(f"cannot truncate a rank-{self.rank} adapter to rank {r}")
        return LoRAPair(self.A[:r], self.B[:, :r])

    def pad(self, rank: int) -> LoRAPair:
        """Zero-pad to ``rank`` rank dimensions (HetLoRA's padding)."""
        if rank < self.rank:
            raise ValueError(f"cannot pad a rank-{self.rank} adapter down to rank {rank}")
        A = self.A.new_zeros(rank, self.A.shape[1])
        B = self.B.new_zeros(self.B.shape[0], rank)
        A[: self.rank] = self.A
        B[:, : self.rank] = self.B
        return LoRAPair(A, B)

    def delta(self, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weight change ``scale * B @ A`` (out_features, in_features), computed in ``dtype``."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * scale

    def clone(self) -> LoRAPair:
        return LoRAPair(self.A.detach().clone(), self.B.detach().clone())


Adapter = dict[str, LoRAPair]
"""A whole model's adapter: module name -> LoRAPair."""


@dataclass(frozen=True)
class Scaling:
    """The LoRA scale s(r) applied to the rank-r truncation.

    - ``fixed``: s(r) = alpha / R (prefixes are partial sums of one function);
    - ``per_rank``: s(r) = alpha / r (PEFT, DyLoRA);
    - ``rslora``: s(r) = alpha / sqrt(r) (Kalajdzievski 2023).
    """

    kind: ScalingKind
    alpha: float
    max_rank: int

    def __post_init__(self) -> None:
        if self.kind not in SCALING_KINDS:
            raise ValueError(f"unknown scaling {self.kind!r}; choose one of {', '.join(SCALING_KINDS)}")
        if self.max_rank <= 0 or self.alpha <= 0:
            raise ValueError("scaling needs max_rank > 0 and alpha > 0")

    def __call__(self, r: int) -> float:
        if self.kind == "fixed":
            return self.alpha / self.max_rank
        if self.kind == "per_rank":
            return self.alpha / r
        return self.alpha / math.sqrt(r)


def adapter_rank(adapter: Adapter) -> int:
    """The common rank of every module of ``adapter``; raises if they differ."""
    ranks = {pair.rank for pair in adapter.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter modules have different ranks: {sorted(ranks)}")
    return ranks.pop()


def adapter_num_bytes(adapter: Adapter) -> int:
    """Bytes of all factors as stored (what a message carries)."""
    return sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size() for p in adapter.values())


def init_adapter(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator) -> Adapter:
    """Fresh rank-``rank`` adapter for modules of ``(out, in)`` shapes.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default, a=sqrt(5)), B = 0,
    so the adapter starts as the identity change dW = 0.
    """
    adapter: Adapter = {}
    for name, (out_features, in_features) in shapes.items():
        bound = 1.0 / math.sqrt(in_features)
        A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        adapter[name] = LoRAPair(A, torch.zeros(out_features, rank))
    return adapter


def save_adapter(adapter: Adapter, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors (``<module>.A`` / ``<module>.B``), atomically."""
    from safetensors.torch import save

    from prelort.atomic_files import atomic_write_bytes

    tensors = {}
    for name, pair in adapter.items():
        tensors[f"{name}.A"] = pair.A.detach().contiguous().float()
        tensors[f"{name}.B"] = pair.B.detach().contiguous().float()
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_adapter(path: str | Path) -> Adapter:
    """Inverse of ``save_adapter``; raises ValueError on a damaged or foreign file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable adapter file ({exc})") from None
    names = {k.rsplit(".", 1)[0] for k in tensors}
    try:
        return {n: LoRAPair(tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in sorted(names)}
    except KeyError as exc:
        raise ValueError(f"{path}: adapter file misses tensor {exc}") from None


def add_deltas(
    a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    """Module-wise sum of two weight-delta maps (a module missing from one counts as zero)."""
    if a is None or b is None:
        return a if b is None else b
    return {**a, **{k: a[k] + v if k in a else v for k, v in b.items()}}
