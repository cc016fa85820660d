"""The sections of the run configuration (``[run]``, ``[clients]``, ...), each checking itself.

Every section's ``validate`` checks its own values (finite, in range, consistent with each
other) and raises ``ConfigError`` with one line naming the key and the fix;
``prelort.config.Config.validate`` calls them and adds the checks that span sections.
The value checks they share (``_real``, ``_int_at_least``, ...) are in
``prelort.config_checks``. Re-exported by ``prelort.config``. Pure: imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from prelort.config_checks import _choice as _choice  # re-exported: prelort.config imports it here
from prelort.config_checks import _int_at_least, _real, _scale_options, _seed
from prelort.errors import ConfigError

REPORT_TARGETS = ("tensorboard", "mlflow")
"""Values of ``run.report_to``."""


@dataclass
class RunSection:
    """[run]: which method, how long, how many clients per round."""

    method: str = "prelort"
    seed: int = 0
    rounds: int = 20
    clients_per_round: int = 4
    eval_every: int = 5
    eval_levels: list[int] = field(default_factory=list)
    """Rank levels evaluated (empty: every level)."""
    min_clients: int = 1
    """Fewer valid updates than this in a round: the round is skipped (global kept)."""
    client_timeout: float = 0.0
    """Seconds a client may take; a later update is dropped (0: no limit)."""
    max_update_norm: float = 0.0
    """Reject updates whose norm sqrt(sum ||A||^2 + ||B||^2) exceeds this (0: no bound)."""
    tensorboard: bool = False
    """Also write TensorBoard event files (per-rank metrics, loss, bytes, passes) to OUT/tensorboard
    (the same as "tensorboard" in run.report_to)."""
    report_to: list[str] = field(default_factory=list)
    """Where the per-round metrics also go: "tensorboard" (event files in OUT/tensorboard) and
    "mlflow" (a run in experiment "prelort" of run.mlflow_uri, with the resolved config as params)."""
    mlflow_uri: str = ""
    """MLflow tracking URI of report_to "mlflow"; empty: a local store, sqlite:///OUT/mlflow.db
    (``mlflow ui --backend-store-uri`` reads it)."""
    sampling: Literal["uniform", "stratified"] = "stratified"
    """Client sampling per round: ``uniform`` without replacement, or ``stratified``: every
    rank level in every round when clients_per_round >= number of levels (highest first)."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before ``run.method`` is checked, in every process that reads
    the config (Flower's ServerApp and ClientApps included): a module that registers a rule
    and a method (``aggregation.register``, ``federation.methods.register_method``) makes it
    selectable."""

    def validate(self) -> None:
        """Checks of [run] (``run.method`` and ``run.eval_levels``: ``Config.validate``)."""
        _seed("run.seed", self.seed)
        _int_at_least("run.rounds", self.rounds, 1)
        _int_at_least("run.eval_every", self.eval_every, 1)
        _int_at_least("run.clients_per_round", self.clients_per_round, 1)
        _int_at_least("run.min_clients", self.min_clients, 1)
        if self.min_clients > self.clients_per_round:
            raise ConfigError(
                f"run.min_clients = {self.min_clients} is more than run.clients_per_round = "
                f"{self.clients_per_round}; no round could ever aggregate"
            )
        _real("run.client_timeout", self.client_timeout, lo=0.0, hint="0 disables the limit")
        _real("run.max_update_norm", self.max_update_norm, lo=0.0, hint="0 disables the bound")
        for i, target in enumerate(self.report_to):
            _choice(f"run.report_to[{i}]", target, REPORT_TARGETS)
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"run.report_to = {self.report_to} lists a target twice")

    def reports(self) -> tuple[str, ...]:
        """The report targets, ``run.tensorboard`` included."""
        return tuple(
            t for t in REPORT_TARGETS if t in self.report_to or (t == "tensorboard" and self.tensorboard)
        )


@dataclass
class ClientsSection:
    """[clients]: the population and its rank capacities."""

    num_clients: int = 8
    levels: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    ranks: list[int] | None = None
    """Explicit rank per client; when absent ranks are drawn from ``rank_distribution``."""
    rank_distribution: Literal["uniform", "heavy-tail", "cycle"] = "cycle"

    def validate(self) -> None:
        """Checks of [clients]: the population, its levels and explicit ranks."""
        _int_at_least("clients.num_clients", self.num_clients, 1)
        levels = self.levels
        if not levels or any(lv <= 0 for lv in levels) or sorted(set(levels)) != levels:
            raise ConfigError(f"clients.levels = {levels} must be positive, strictly increasing ranks")
        for i, lv in enumerate(levels):
            _int_at_least(f"clients.levels[{i}]", lv, 1)
        if self.ranks is not None:
            if len(self.ranks) != self.num_clients:
                raise ConfigError(
                    f"clients.ranks has {len(self.ranks)} entries for {self.num_clients} clients; "
                    "give one rank per client"
                )
            bad = [r for r in self.ranks if r not in levels]
            if bad:
                raise ConfigError(f"clients.ranks: rank(s) {bad} not in clients.levels {levels}")


@dataclass
class LoRASection:
    """[lora]: adapter scale and targets (R = max level)."""

    alpha: float = 16.0
    scaling: Literal["fixed", "per_rank", "rslora"] = "fixed"
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    """Module name suffixes; empty means the workload's default."""

    def validate(self) -> None:
        """Checks of [lora]."""
        _real("lora.alpha", self.alpha, lo=0.0, lo_open=True)
        _real("lora.dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        empty = [i for i, m in enumerate(self.target_modules) if not m.strip()]
        if empty:
            raise ConfigError(f"lora.target_modules[{empty[0]}] is empty; give module name suffixes")


@dataclass
class TrainSection:
    """[train]: local optimisation."""

    steps: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    nested_mode: Literal["all", "sample", "sandwich", "matryoshka"] = "sample"
    """``sample`` (one level per step, one pass) won over ``all`` at matched passes in the
    nested-objective study (bench/results/nested_study), and over ``sandwich`` and
    ``matryoshka`` in the pre-registered method study (bench/results/method_study), which
    chose ``own_weight`` 0.9.
    ``sandwich``: every step one pass at the own rank and one at a lower level drawn from c
    (two passes); ``matryoshka``: one pass with rank dimension i weighted by
    sum_{l > i} c_l (MatryoshkaLoRA); docs/design.md §2."""
    own_weight: float | Literal["equal", "geometric"] = 0.9
    """Share of the client's own rank among its nested levels; "equal" weights; or
    "geometric": c_l proportional to 2^j for the j-th level (each level twice the one below)."""
    own_weight_final: float | None = None
    """With a numeric ``own_weight``: the own weight moves linearly from ``own_weight`` in
    round 1 to this in round ``run.rounds`` (None: constant)."""
    distill: float = 0.0
    """lambda in [0, 1] of FjORD-style self-distillation (``sandwich`` and ``all`` only): the
    loss at a lower level l becomes (1 - lambda) loss(l) + lambda D(output at l, own-rank
    output of the same step, detached); D is MSE (synthetic) or KL(teacher || student) (LLM)."""
    factors: Literal["both", "b-only", "alternate"] = "both"
    """Which LoRA factors clients train: both; B only with A frozen at its shared random
    init (FFA-LoRA); or alternating rounds, B on odd rounds and A on even ones (RoLoRA)."""
    max_grad_norm: float | None = None
    budget: Literal["steps", "passes"] = "passes"
    """``steps``: every client makes ``steps`` optimiser steps; ``passes``: every client makes
    ``steps`` forward/backward passes (a nested ``all`` client with |L_k| levels gets
    max(1, round(steps / |L_k|)) steps, a ``sandwich`` client with more than one level
    max(1, round(steps / 2))), so methods are compared at matched compute."""
    grad_accum: int = 1
    """Micro-batches (of ``batch_size``) per optimiser step, each loss divided by it: one step
    on the concatenated batch. ``steps`` counts optimiser steps, so a client makes about
    ``steps * grad_accum`` passes of one micro-batch (``TrainStats.passes``)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over a client's local steps of each round (transformers.get_scheduler)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up from 0 at the start of each client's round."""
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """torch.autocast of the forward passes: bf16 (CUDA or CPU), fp16 (CUDA, GradScaler)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the HF model (llm workload; use_reentrant=False)."""

    def validate(self) -> None:
        """Checks of [train] (``factors`` with the aggregation order: ``Config.validate``)."""
        _int_at_least("train.steps", self.steps, 1)
        _int_at_least("train.batch_size", self.batch_size, 1)
        _real("train.lr", self.lr, lo=0.0, lo_open=True)
        _real("train.weight_decay", self.weight_decay, lo=0.0)
        if self.own_weight not in ("equal", "geometric"):
            _real(
                "train.own_weight",
                float(self.own_weight),
                lo=0.0,
                hi=1.0,
                lo_open=True,
                hint='or "equal" or "geometric"',
            )
        if self.own_weight_final is not None:
            if self.own_weight in ("equal", "geometric"):
                raise ConfigError(
                    f"train.own_weight_final needs a numeric train.own_weight, got {self.own_weight!r}; "
                    "omit it or give own_weight a number"
                )
            _real("train.own_weight_final", self.own_weight_final, lo=0.0, hi=1.0, lo_open=True)
        _real("train.distill", self.distill, lo=0.0, hi=1.0, hint="0 disables self-distillation")
        if self.distill > 0 and self.nested_mode not in ("sandwich", "all"):
            raise ConfigError(
                f'train.distill = {self.distill!r} needs train.nested_mode = "sandwich" or "all" '
                f"(got {self.nested_mode!r}); set it to 0 or change the mode"
            )
        if self.max_grad_norm is not None:
            _real(
                "train.max_grad_norm",
                self.max_grad_norm,
                lo=0.0,
                lo_open=True,
                hint="omit it for no clipping",
            )
        _scale_options(self.grad_accum, self.lr_schedule, self.warmup_steps, self.autocast)


@dataclass
class AggregationSection:
    """[aggregation]: options of the segment-wise rules (``segment``, ``prelort``)."""

    order: Literal["auto", "ownership", "round", "export"] = "auto"
    """Rank-dimension order (docs/design.md §4.2b): ``ownership`` as averaged; ``round``: after
    every aggregation, rotated so every prefix is the best rank-r approximation of the full
    product; ``export``: that rotation only for evaluation and export; ``auto``: the method's
    own (``segment``: ownership, ``prelort``: its default, federation/methods.py)."""
    split: Literal["balanced", "b"] = "balanced"
    """How the re-ordered spectrum S is shared: ``balanced`` (A' = S^1/2 V^T Q_A^T,
    B' = Q_B U S^1/2) or ``b`` (A' orthonormal rows, B' = Q_B U S); same product and prefixes."""

    def validate(self) -> None:
        """Nothing beyond the choices of its keys: whether ``order`` applies to the method is a
        check of ``Config.validate``."""


@dataclass
class HetLoRASection:
    """[hetlora]: rank self-pruning (Cho et al. 2024)."""

    gamma: float = 0.99
    lam: float = 0.01
    min_rank: int | None = None
    """Floor of self-pruning (None: the smallest rank level)."""

    def validate(self) -> None:
        """Checks of [hetlora] (``min_rank`` against the largest level: ``Config.validate``)."""
        _real("hetlora.gamma", self.gamma, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _real("hetlora.lam", self.lam, lo=0.0)
        if self.min_rank is not None:
            _int_at_least("hetlora.min_rank", self.min_rank, 1)


@dataclass
class FloristSection:
    """[florist]: FLoRIST's singular-value thresholding (Ramesh and Dass 2026)."""

    energy_threshold: float = 0.9
    """tau: the smallest rank whose singular values hold this share of the energy is kept."""

    def validate(self) -> None:
        """Checks of [florist]: 0 < tau <= 1."""
        _real("florist.energy_threshold", self.energy_threshold, lo=0.0, hi=1.0, lo_open=True)


@dataclass
class PrivacySection:
    """[privacy]: client-level differential privacy and secure aggregation (docs/privacy.md).

    Only the segment-wise methods (``prelort``, ``segment``) and FedIT run under it: their
    rule is a ratio of sums (docs/design.md §4.9). Differential privacy is on when ``clip``
    is given, with exactly one of ``noise_multiplier`` and ``target_epsilon``, and ``delta``.
    """

    clip: float | None = None
    """L2 bound C on each client's update (its prefix's change in a round, all modules)."""
    noise_multiplier: float | None = None
    """z: Gaussian noise of std z * C on every coordinate of each segment's sum."""
    target_epsilon: float | None = None
    """Instead of ``noise_multiplier``: the smallest z meeting (epsilon, delta) over run.rounds."""
    delta: float | None = None
    """The delta of the (epsilon, delta) guarantee (required with ``clip``)."""
    noise_seed: int | None = None
    """Seed of the server's noise (reproducible runs and tests only: whoever knows it can
    remove the noise). None: fresh operating-system randomness every round."""
    secure_aggregation: bool = False
    """Aggregate only sums: Flower runs use SecAgg+; in-process runs sum as it would."""
    min_segment_owners: int = 2
    """Secure aggregation: a segment is aggregated in a round only if at least this many
    sampled clients own it (a segment's sum over one owner is that owner's rows)."""
    secagg_clipping_range: float = 8.0
    """SecAgg+: every sent entry is clipped to [-range, range] before quantization."""
    secagg_bits: int = 22
    """SecAgg+: entries are quantized to 2^bits levels over the clipping range."""
    secagg_threshold: float = 0.67
    """SecAgg+: share of a client's key shares needed to unmask (dropouts tolerated: the rest)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+ without differential privacy: client weight w_k = n_k / this (n_k above it: the
    client fails its round)."""

    @property
    def dp(self) -> bool:
        """Whether differential privacy is on (``clip`` or a noise setting given)."""
        return self.clip is not None or self.noise_multiplier is not None or self.target_epsilon is not None

    def validate(self) -> None:
        """Checks of [privacy]: every number first (finite, in range), then the consistency of
        the section (``Config.validate`` checks it against the method and run.clients_per_round
        between the two)."""
        self.validate_values()
        self.validate_consistency()

    def validate_values(self) -> None:
        """Every number of [privacy] is finite and in range."""
        for key in ("clip", "noise_multiplier", "target_epsilon"):
            value = getattr(self, key)
            if value is not None:
                _real(f"privacy.{key}", value, lo=0.0, lo_open=True)
        if self.delta is not None:
            _real("privacy.delta", self.delta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.noise_seed is not None:
            _seed("privacy.noise_seed", self.noise_seed)
        _int_at_least("privacy.min_segment_owners", self.min_segment_owners, 1)
        _real("privacy.secagg_clipping_range", self.secagg_clipping_range, lo=0.0, lo_open=True)
        _real("privacy.secagg_threshold", self.secagg_threshold, lo=0.0, hi=1.0, lo_open=True)
        _real("privacy.secagg_max_weight", self.secagg_max_weight, lo=0.0, lo_open=True)
        _int_at_least("privacy.secagg_bits", self.secagg_bits, 1)

    def validate_consistency(self) -> None:
        """Differential privacy needs clip, one noise setting and delta; [privacy] enables something."""
        if self.dp:
            if self.clip is None:
                given = "noise_multiplier" if self.noise_multiplier is not None else "target_epsilon"
                raise ConfigError(f"privacy.{given} needs privacy.clip (the L2 bound C of an update)")
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                got = "both" if self.noise_multiplier is not None else "neither"
                raise ConfigError(
                    f"privacy.clip = {self.clip!r} needs exactly one of privacy.noise_multiplier and "
                    f"privacy.target_epsilon, got {got}"
                )
            if self.delta is None:
                raise ConfigError(
                    f"privacy.clip = {self.clip!r} needs privacy.delta (e.g. 1e-5, below 1 / clients)"
                )
        else:
            if self.delta is not None:
                raise ConfigError("privacy.delta needs privacy.clip and a noise_multiplier or target_epsilon")
            if not self.secure_aggregation:
                tuning = ", ".join(
                    f.name
                    for f in dataclasses.fields(self)
                    if f.name
                    not in ("clip", "noise_multiplier", "target_epsilon", "delta", "secure_aggregation")
                )
                raise ConfigError(
                    "[privacy] enables nothing: set privacy.clip with privacy.noise_multiplier or "
                    "privacy.target_epsilon and privacy.delta, or privacy.secure_aggregation = true "
                    f"({tuning} only tune them)"
                )
