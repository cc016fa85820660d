"""Sum form of the segment-wise rule: what secure aggregation and differential privacy sum.

The segment-wise average (``segment.py``, docs/design.md §4.2) of rank row i is a ratio of
two sums over the clients that own the row (r_k > i):

    A_new[i] = sum_k w_k A_k[i] / sum_k w_k,     B_new[:, i] = sum_k w_k B_k[:, i] / sum_k w_k,

so a client can send *additive* messages and the server needs only their sum
(docs/design.md §4.9):

**Padded layout** (``client_sums``; one vector of the same shape from every client, what
one secure-sum instance such as Flower's SecAgg+ needs): per module ``w_k A_k`` zero-padded
to R rows and ``w_k B_k`` zero-padded to R columns, plus one per-row weight vector
``v_k[i] = w_k`` for owned rows (i < r_k), 0 otherwise (shared by all modules). The server
adds the messages (``RowSums.__add__``) and divides row by row (``apply_sums``); a row whose
summed weight is 0 (no client owned it) keeps its old value. With ``reference`` (the prefix
the client was sent) the message carries the weighted *change* ``w_k (A_k - A_sent)``
instead, and the server adds the ratio to the old row; every owner was sent the same global
prefix, so both give the same average (up to rounding). Upload per client:
``4 (R sum_m (in_m + out_m) + R)`` bytes instead of its prefix's ``4 r_k sum_m (in_m + out_m)``:
a rank-r_k client pays R / r_k times its plain upload (``padded_upload_bytes``).

**Segment layout** (``client_segment_pieces``; cheaper): one sum per segment
j = [l_{j-1}, l_j) over that segment's owners only. A client sends, for each segment it
owns, its own rows of the segment (weighted) and one weight: exactly its prefix plus one
number per owned segment (``segmented_upload_bytes``), no padding. Under secure aggregation
that is one secure-sum instance per segment, each over a different set of clients.

Both give exactly ``segment_average`` (tests/test_privacy.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.base import ClientUpdate, check_updates

FLOAT_BYTES = 4
"""Bytes per entry as sent (fp32), as everywhere in the byte counts (docs/design.md §4)."""


@dataclass(frozen=True)
class RowSums:
    """Summed padded messages: per module A (R, in) and B (out, R), and the row weights (R,).

    One client's message is a ``RowSums`` too; ``+`` is the (secure) sum. float64.
    """

    factors: dict[str, LoRAPair]
    weight: torch.Tensor

    def __add__(self, other: RowSums) -> RowSums:
        if set(self.factors) != set(other.factors) or self.weight.shape != other.weight.shape:
            raise ValueError("cannot add sums of different layouts")
        return RowSums(
            {
                name: LoRAPair(p.A + other.factors[name].A, p.B + other.factors[name].B)
                for name, p in self.factors.items()
            },
            self.weight + other.weight,
        )

    @property
    def max_rank(self) -> int:
        return int(self.weight.shape[0])

    def to_arrays(self) -> list[np.ndarray]:
        """The flat wire layout: for every module (sorted by name) A then B, then the weights."""
        out: list[np.ndarray] = []
        for name in sorted(self.factors):
            out += [self.factors[name].A.numpy(), self.factors[name].B.numpy()]
        out.append(self.weight.numpy())
        return out

    @staticmethod
    def from_arrays(arrays: Sequence[np.ndarray], shapes: Mapping[str, tuple[int, int]]) -> RowSums:
        """Inverse of ``to_arrays`` for modules of ``(out, in)`` ``shapes``; ValueError on a mismatch."""
        names = sorted(shapes)
        if len(arrays) != 2 * len(names) + 1:
            raise ValueError(f"expected {2 * len(names) + 1} arrays, got {len(arrays)}")
        weight = torch.from_numpy(np.asarray(arrays[-1], dtype=np.float64).copy())
        rank = int(weight.shape[0]) if weight.dim() == 1 else -1
        factors: dict[str, LoRAPair] = {}
        for i, name in enumerate(names):
            out_f, in_f = shapes[name]
            A = torch.from_numpy(np.asarray(arrays[2 * i], dtype=np.float64).copy())
            B = torch.from_numpy(np.asarray(arrays[2 * i + 1], dtype=np.float64).copy())
            if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
                raise ValueError(
                    f"module {name}: arrays A{tuple(A.shape)} B{tuple(B.shape)}, "
                    f"expected A{(rank, in_f)} B{(out_f, rank)}"
                )
            factors[name] = LoRAPair(A, B)
        return RowSums(factors, weight)


def zero_sums(global_adapter: Adapter) -> RowSums:
    """The empty sum (every entry 0) in the layout of ``global_adapter``."""
    rank = next(iter(global_adapter.values())).rank
    return RowSums(
        {
            name: LoRAPair(
                torch.zeros(g.A.shape, dtype=torch.float64), torch.zeros(g.B.shape, dtype=torch.float64)
            )
            for name, g in global_adapter.items()
        },
        torch.zeros(rank, dtype=torch.float64),
    )


def client_sums(
    update: ClientUpdate,
    max_rank: int,
    weight: float,
    *,
    reference: Adapter | None = None,
    rows: int | None = None,
) -> RowSums:
    """One client's padded message: ``weight * A_k`` (rows >= r_k zero), ``weight * B_k``
    (columns >= r_k zero) and the row weights (``weight`` for rows < r_k, else 0).

    ``reference``: the prefix the client was sent; the message then carries
    ``weight * (A_k - A_sent)`` (delta form). ``rows``: send only the first ``rows`` rank
    rows (the rest as if not owned; the segments of too few owners under secure aggregation).
    """
    r = update.rank if rows is None else min(update.rank, rows)
    factors: dict[str, LoRAPair] = {}
    for name, pair in update.adapter.items():
        A = torch.zeros(max_rank, pair.A.shape[1], dtype=torch.float64)
        B = torch.zeros(pair.B.shape[0], max_rank, dtype=torch.float64)
        a, b = pair.A[:r].double(), pair.B[:, :r].double()
        if reference is not None:
            a = a - reference[name].A[:r].double()
            b = b - reference[name].B[:, :r].double()
        A[:r] = weight * a
        B[:, :r] = weight * b
        factors[name] = LoRAPair(A, B)
    w = torch.zeros(max_rank, dtype=torch.float64)
    w[:r] = weight
    return RowSums(factors, w)


def apply_sums(
    global_adapter: Adapter,
    sums: RowSums,
    *,
    delta: bool = False,
    denominator: torch.Tensor | None = None,
) -> Adapter:
    """The new global adapter from summed messages: row i is ``S[i] / W[i]`` (``delta``:
    ``g[i] + S[i] / W[i]``) where W[i] > 0, and keeps its old value where W[i] = 0.

    ``denominator`` replaces the summed weights W (the public owner counts under
    differential privacy, which the server knows from its own sampling).
    """
    den = (sums.weight if denominator is None else denominator).double()
    owned = den > 0
    safe = torch.where(owned, den, torch.ones_like(den))
    out: Adapter = {}
    for name, g in global_adapter.items():
        S = sums.factors[name]
        A = S.A / safe[:, None]
        B = S.B / safe[None, :]
        if delta:
            A = A + g.A.double()
            B = B + g.B.double()
        A = torch.where(owned[:, None], A, g.A.double())
        B = torch.where(owned[None, :], B, g.B.double())
        out[name] = LoRAPair(A.to(g.A.dtype), B.to(g.B.dtype))
    return out


def sum_form_average(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> Adapter:
    """``segment_average`` computed as the server would under secure aggregation: the sum of
    every client's padded message (weight n_k), divided row by row."""
    max_rank = check_updates(global_adapter, updates)
    total = zero_sums(global_adapter)
    for u in updates:
        total = total + client_sums(u, max_rank, float(u.num_examples))
    return apply_sums(global_adapter, total)


def padded_upload_bytes(global_adapter: Adapter) -> int:
    """Bytes of one padded message: every module's A and B at rank R, plus R row weights."""
    rank = next(iter(global_adapter.values())).rank
    entries = sum(g.A.numel() + g.B.numel() for g in global_adapter.values()) + rank
    return FLOAT_BYTES * entries


# -- the segment layout: one sum per segment over its owners ----------------------------------
@dataclass(frozen=True)
class SegmentPiece:
    """One client's (or the summed) contribution to one segment: rows [lo, hi) of every
    module, weighted, and the weight."""

    factors: dict[str, LoRAPair]
    weight: float

    def __add__(self, other: SegmentPiece) -> SegmentPiece:
        return SegmentPiece(
            {
                name: LoRAPair(p.A + other.factors[name].A, p.B + other.factors[name].B)
                for name, p in self.factors.items()
            },
            self.weight + other.weight,
        )


def segments(levels: Sequence[int]) -> list[tuple[int, int]]:
    """The segments [l_{j-1}, l_j) of the rank levels (l_0 = 0)."""
    bounds = [0, *sorted(levels)]
    return [(bounds[j], bounds[j + 1]) for j in range(len(levels))]


def client_segment_pieces(
    update: ClientUpdate, levels: Sequence[int], weight: float
) -> dict[int, SegmentPiece]:
    """Client k's messages in the segment layout: for every segment j it owns (l_j <= r_k)
    its rows of the segment times ``weight``, and ``weight``."""
    out: dict[int, SegmentPiece] = {}
    for j, (lo, hi) in enumerate(segments(levels)):
        if hi > update.rank:
            break
        out[j] = SegmentPiece(
            {
                name: LoRAPair(weight * p.A[lo:hi].double(), weight * p.B[:, lo:hi].double())
                for name, p in update.adapter.items()
            },
            weight,
        )
    return out


def segment_layout_average(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], levels: Sequence[int]
) -> Adapter:
    """``segment_average`` from one sum per segment over its owners (the segment layout).

    Every client rank must be a level (as in every segment-wise method)."""
    check_updates(global_adapter, updates)
    bad = sorted({u.rank for u in updates} - set(levels))
    if bad:
        raise ValueError(f"segment layout: ranks {bad} are not levels {sorted(levels)}")
    sums: dict[int, SegmentPiece] = {}
    for u in updates:
        for j, piece in client_segment_pieces(u, levels, float(u.num_examples)).items():
            sums[j] = piece if j not in sums else sums[j] + piece
    out: Adapter = {
        name: LoRAPair(g.A.double().clone(), g.B.double().clone()) for name, g in global_adapter.items()
    }
    for j, (lo, hi) in enumerate(segments(levels)):
        if j not in sums or sums[j].weight <= 0:
            continue  # nobody owned the segment: kept
        for name, p in sums[j].factors.items():
            out[name].A[lo:hi] = p.A / sums[j].weight
            out[name].B[:, lo:hi] = p.B / sums[j].weight
    return {
        name: LoRAPair(p.A.to(global_adapter[name].A.dtype), p.B.to(global_adapter[name].B.dtype))
        for name, p in out.items()
    }


def segmented_upload_bytes(update: ClientUpdate, levels: Sequence[int]) -> int:
    """Bytes client k sends in the segment layout: its prefix plus one weight per owned segment."""
    owned = sum(1 for _, hi in segments(levels) if hi <= update.rank)
    entries = sum(p.A.numel() + p.B.numel() for p in update.adapter.values()) + owned
    return FLOAT_BYTES * entries
