"""Client-level differential privacy and the secure-sum round of the segment-wise rule.

What a ``[privacy]`` run does (docs/privacy.md states the guarantee; docs/design.md §4.9):

- **Client** (``clip_update``, called by ``client_update``): its update is the change of its
  prefix this round, ``D_k = (A_k - A_sent, B_k - B_sent)`` over all modules; it is scaled
  to L2 norm at most ``clip`` = C, and the client returns ``sent + clipped D_k``.
- **Message** (``aggregation.sumform.client_sums`` in delta form): ``w_k D_k`` zero-padded
  to rank R and the row weights. Under differential privacy every client has weight
  ``w_k = 1`` (data sizes would make a client's influence unbounded and the denominator
  data-dependent); otherwise ``w_k = n_k`` (in-process) or ``n_k / secagg_max_weight``
  (SecAgg+, whose entries must lie in its clipping range).
- **Server** (``privatize``): after the sum (and, under SecAgg+, after unmasking: central
  DP) it adds N(0, (z C)^2) to every summed coordinate of every row some client owned, and
  divides row i by the *public* number of owners c_i (the server sampled the clients and
  knows their ranks). Rows nobody owned keep their value and release nothing.
- **Accounting** (``epsilon``, ``calibrate_noise``): adding or zeroing one client's whole
  contribution changes the summed vector by at most C in L2 (all segments together), so a
  round is one Gaussian mechanism of noise multiplier z whatever the ranks; T rounds compose
  to a Gaussian mechanism of multiplier z / sqrt(T) (Dong, Roth and Su 2019), whose exact
  (epsilon, delta) comes from Google's ``dp-accounting`` (``get_epsilon_gaussian``, the
  analytic Gaussian mechanism of Balle and Wang 2018; tests check it against the library's
  PLD accountant). No amplification by sampling is claimed (sampling probability 1 per
  client and round): stratified sampling is neither Poisson nor uniform sampling, so the
  standard amplification theorems do not apply; the bound without amplification holds for
  any sampling that does not look at client data.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from prelort.adapters.state import Adapter, LoRAPair
from prelort.aggregation.sumform import RowSums
from prelort.config import Config
from prelort.errors import UserError
from prelort.seeding import derive_seed


@dataclass(frozen=True)
class PrivacyPlan:
    """The ``[privacy]`` section resolved once (the noise multiplier calibrated)."""

    secure: bool
    """Aggregate only sums (SecAgg+ over Flower; the in-process runtime sums as it would)."""
    min_segment_owners: int
    clip: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    noise_seed: int | None = None
    secagg_clipping_range: float = 8.0
    secagg_bits: int = 22
    secagg_threshold: float = 0.67
    secagg_max_weight: float = 1000.0

    @property
    def dp(self) -> bool:
        return self.clip is not None

    @property
    def noise_std(self) -> float:
        """Std of the noise on every summed coordinate: z * C."""
        assert self.clip is not None and self.noise_multiplier is not None
        return self.noise_multiplier * self.clip

    def weight(self, num_examples: int, *, secagg: bool = False) -> float:
        """Client weight w_k in the sums: 1 under DP, else n_k (SecAgg+: n_k / max_weight)."""
        if self.dp:
            return 1.0
        if secagg:
            if num_examples > self.secagg_max_weight:
                raise ValueError(
                    f"n_k = {num_examples} above privacy.secagg_max_weight = {self.secagg_max_weight:g}"
                )
            return num_examples / self.secagg_max_weight
        return float(num_examples)

    def min_owners(self) -> int:
        """Owners a segment needs to be aggregated (secure aggregation only; else 1)."""
        return self.min_segment_owners if self.secure else 1


def resolve_privacy(cfg: Config) -> PrivacyPlan | None:
    """The run's ``PrivacyPlan`` (None without a [privacy] section); calibrates z from
    ``target_epsilon`` over ``run.rounds``."""
    p = cfg.privacy
    if p is None:
        return None
    plan = PrivacyPlan(
        secure=p.secure_aggregation,
        min_segment_owners=p.min_segment_owners,
        noise_seed=p.noise_seed,
        secagg_clipping_range=p.secagg_clipping_range,
        secagg_bits=p.secagg_bits,
        secagg_threshold=p.secagg_threshold,
        secagg_max_weight=p.secagg_max_weight,
    )
    if not p.dp:
        return plan
    assert p.clip is not None and p.delta is not None
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        z = calibrate_noise(p.target_epsilon, cfg.run.rounds, p.delta)
    return replace(plan, clip=p.clip, noise_multiplier=z, delta=p.delta, target_epsilon=p.target_epsilon)


# -- accounting ---------------------------------------------------------------------------------
def _gaussian() -> Any:
    try:
        from dp_accounting import gaussian_mechanism
    except ImportError:  # an optional extra
        raise UserError(
            "[privacy] with clip needs Google's dp-accounting; pip install 'prelort[privacy]'"
        ) from None
    return gaussian_mechanism


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon at ``delta`` of ``rounds`` Gaussian mechanisms of multiplier z (sensitivity C,
    std z C), composed: one Gaussian mechanism of multiplier z / sqrt(rounds)."""
    if rounds <= 0:
        return 0.0
    return float(_gaussian().get_epsilon_gaussian(noise_multiplier / math.sqrt(rounds), delta))


def calibrate_noise(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier z with ``epsilon(z, rounds, delta) <= target_epsilon``."""
    z = float(_gaussian().get_sigma_gaussian(target_epsilon, delta)) * math.sqrt(rounds)
    while epsilon(z, rounds, delta) > target_epsilon:  # the root finder's last digits
        z *= 1 + 1e-9
    return z


def privacy_report(plan: PrivacyPlan, rounds: int) -> dict[str, Any]:
    """The ``privacy`` block of ``results.json`` after ``rounds`` rounds."""
    out: dict[str, Any] = {
        "secure_aggregation": plan.secure,
        "min_segment_owners": plan.min_owners(),
        "rounds": rounds,
    }
    if plan.dp:
        assert plan.noise_multiplier is not None and plan.delta is not None
        out.update(
            {
                "epsilon": epsilon(plan.noise_multiplier, rounds, plan.delta),
                "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier,
                "clip": plan.clip,
                "target_epsilon": plan.target_epsilon,
                "unit": "client (all its data, all rounds); neighbouring: its updates zeroed",
                "sampling_probability": 1.0,
                "accountant": "dp_accounting.gaussian_mechanism (analytic Gaussian, composed)",
                "noise": "central: added by the server to each segment's sum"
                + (" after SecAgg+ unmasking" if plan.secure else ""),
                "client_weights": "equal (1 per client)",
            }
        )
    return out


# -- the client's clipping ----------------------------------------------------------------------
def change_norm(sent: Adapter, trained: Adapter) -> float:
    """L2 norm of the change ``trained - sent`` over every module (the rows trained holds)."""
    total = 0.0
    for name, pair in trained.items():
        r = pair.rank
        ref = sent[name]
        total += float((pair.A.double() - ref.A[:r].double()).pow(2).sum())
        total += float((pair.B.double() - ref.B[:, :r].double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(sent: Adapter, trained: Adapter, clip: float) -> Adapter:
    """``sent + min(1, C / ||D||) D`` with D = ``trained - sent`` (over every module)."""
    norm = change_norm(sent, trained)
    if norm <= clip:
        return trained
    scale = clip / norm
    out: Adapter = {}
    for name, pair in trained.items():
        r = pair.rank
        ref = sent[name]
        A = ref.A[:r].double() + scale * (pair.A.double() - ref.A[:r].double())
        B = ref.B[:, :r].double() + scale * (pair.B.double() - ref.B[:, :r].double())
        out[name] = LoRAPair(A.to(pair.A.dtype), B.to(pair.B.dtype))
    return out


# -- the server's side of a sum round ------------------------------------------------------------
def sent_rows(ranks: Sequence[int], levels: Sequence[int], min_owners: int) -> int:
    """Rank rows clients send this round: the largest level l with at least ``min_owners`` of
    the round's client ``ranks`` >= l (0: none). Owners of higher rows are fewer, so the
    aggregated segments are a prefix."""
    rows = 0
    for lv in sorted(levels):
        if sum(1 for r in ranks if r >= lv) >= min_owners:
            rows = lv
    return rows


def owner_counts(ranks: Sequence[int], max_rank: int, rows: int) -> torch.Tensor:
    """c_i: how many of ``ranks`` own row i (i < min(r, rows)); public to the server."""
    c = torch.zeros(max_rank, dtype=torch.float64)
    for r in ranks:
        c[: min(r, rows)] += 1
    return c


def noise_generator(plan: PrivacyPlan, seed: int, round_: int) -> torch.Generator:
    """The server's noise source: seeded by (noise_seed, round) when ``noise_seed`` is set
    (reproducible, not secret), else by 63 bits of operating-system randomness."""
    if plan.noise_seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed(derive_seed(plan.noise_seed, "dp-noise", round_))


def privatize(sums: RowSums, counts: torch.Tensor, std: float, generator: torch.Generator) -> RowSums:
    """``sums`` plus N(0, std^2) on every coordinate of every row with ``counts`` > 0."""
    owned = counts > 0
    factors: dict[str, LoRAPair] = {}
    for name, p in sums.factors.items():
        nA = torch.randn(p.A.shape, generator=generator, dtype=torch.float64) * std
        nB = torch.randn(p.B.shape, generator=generator, dtype=torch.float64) * std
        factors[name] = LoRAPair(
            p.A + torch.where(owned[:, None], nA, torch.zeros_like(nA)),
            p.B + torch.where(owned[None, :], nB, torch.zeros_like(nB)),
        )
    return RowSums(factors, sums.weight)
