"""Validated run configuration: TOML file + ``--set key=value`` overrides -> ``Config``.

Unknown keys, wrong types and inconsistent values raise ``ConfigError`` with one line
naming the key and what to do (docs/design.md §8: exit status 2).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from prelort.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
    """Also write TensorBoard event files (per-rank metrics, loss, bytes, passes) to OUT/tensorboard."""
    sampling: Literal["uniform", "stratified"] = "stratified"
    """Client sampling per round: ``uniform`` without replacement, or ``stratified``: every
    rank level in every round when clients_per_round >= number of levels (highest first)."""


@dataclass
class ClientsSection:
    """[clients]: the population and its rank capacities."""

    num_clients: int = 8
    levels: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    ranks: list[int] | None = None
    """Explicit rank per client; when absent ranks are drawn from ``rank_distribution``."""
    rank_distribution: Literal["uniform", "heavy-tail", "cycle"] = "cycle"


@dataclass
class LoRASection:
    """[lora]: adapter scale and targets (R = max level)."""

    alpha: float = 16.0
    scaling: Literal["fixed", "per_rank", "rslora"] = "fixed"
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    """Module name suffixes; empty means the workload's default."""


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


@dataclass
class HetLoRASection:
    """[hetlora]: rank self-pruning (Cho et al. 2024)."""

    gamma: float = 0.99
    lam: float = 0.01
    min_rank: int | None = None
    """Floor of self-pruning (None: the smallest rank level)."""


@dataclass
class SyntheticSection:
    """[synthetic]: frozen random MLP and a low-rank teacher change with a decaying spectrum."""

    d_in: int = 32
    hidden: int = 64
    d_out: int = 16
    teacher_rank: int = 16
    teacher_scale: float = 1.0
    spectrum_decay: float = 0.75
    min_examples: int = 64
    max_examples: int = 256
    test_examples: int = 1024
    input_shift: float = 1.0
    data_seed: int | None = None
    """Seed of the data (teacher, client data, test set); None: the run's seed."""


@dataclass
class LLMSection:
    """[llm]: a causal LM fine-tuned on a real dataset (used when workload.kind = "llm")."""

    model: str = "smollm2-135m"
    """Alias (smollm2-135m, gemma3-270m), local HF model folder or hub id."""
    dtype: str = "auto"
    device: str = "auto"
    cache_dir: str = ""
    """Where converted models are cached; empty: $PRELORT_CACHE or ~/.cache/prelort."""
    source: Literal["bbc-news", "natural-instructions", "multiple-choice", "local", "hub"] = "bbc-news"
    path: str = ""
    """File or folder of the source ($VARS expanded); hub: the dataset id."""
    tasks: list[str] = field(default_factory=list)
    """Natural Instructions: the task names to use (empty: all)."""
    fields: dict[str, str] = field(default_factory=dict)
    """local / hub: role -> column (instruction, input, output, category)."""
    split: str = "train"
    max_per_task: int = 0
    max_examples: int = 0
    """Random subset of this many examples before splitting (0: all)."""
    max_chars: int = 1500
    partition: Literal["iid", "dirichlet", "task"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    tasks_per_client: int = 2
    test_examples: int = 100
    max_length: int = 256
    max_new_tokens: int = 32
    eval_batch_size: int = 8
    rouge: bool = False
    """Generate greedily and report ROUGE-L (instruction tasks)."""
    data_seed: int | None = None
    """Seed of the subset, partition and test split; None: the run's seed."""


@dataclass
class WorkloadSection:
    """[workload]: which task the federation trains on."""

    kind: Literal["synthetic", "llm"] = "synthetic"


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

    def validate(self, rule: str, method: str, clients_per_round: int) -> None:
        """Checks of the [privacy] section (called by ``Config.validate``); pure. Every number
        first (finite, in range), then the consistency of the section."""
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
        if self.secagg_bits > 30 or clients_per_round * 2**self.secagg_bits >= 2**32:
            raise ConfigError(
                f"privacy.secagg_bits = {self.secagg_bits} overflows SecAgg+'s 32-bit sums with "
                f"{clients_per_round} clients per round; lower it (clients_per_round * 2^bits < 2^32)"
            )
        if rule not in SUM_RULES:
            raise ConfigError(
                f"[privacy] needs a method whose aggregation is a ratio of sums (prelort, segment, fedit, "
                f"fedit-max, fedit-rN); run.method = {method!r} is not one"
            )
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
        if self.secure_aggregation and clients_per_round < 2:
            raise ConfigError(
                "privacy.secure_aggregation needs run.clients_per_round >= 2 "
                "(a sum of one update is that update)"
            )


@dataclass
class Config:
    """A whole run."""

    run: RunSection = field(default_factory=RunSection)
    clients: ClientsSection = field(default_factory=ClientsSection)
    lora: LoRASection = field(default_factory=LoRASection)
    train: TrainSection = field(default_factory=TrainSection)
    hetlora: HetLoRASection = field(default_factory=HetLoRASection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    llm: LLMSection = field(default_factory=LLMSection)
    privacy: PrivacySection | None = None
    """Absent (None) unless the config has a [privacy] section; then config_to_dict drops
    it, so configs and results of runs without it are unchanged."""

    @property
    def max_rank(self) -> int:
        return max(self.clients.levels)

    def validate(self) -> None:
        """Cross-field checks; raises ConfigError with one line naming the key and the fix.

        Every number is checked (finite, in range, consistent with the others), so no size,
        rate or limit reaches the numerics unchecked. Pure: imports no torch.
        """
        from prelort.federation.methods import ORDER_RULES, get_method, resolve_order

        run, cl = self.run, self.clients
        try:
            spec = get_method(run.method)
        except ValueError as exc:
            raise ConfigError(f"run.method: {exc}") from None
        if spec.level is not None and spec.level not in cl.levels:
            raise ConfigError(
                f"run.method = {run.method!r}: rank {spec.level} is not in clients.levels {cl.levels}"
            )
        _seed("run.seed", run.seed)
        _int_at_least("run.rounds", run.rounds, 1)
        _int_at_least("run.eval_every", run.eval_every, 1)
        _int_at_least("run.clients_per_round", run.clients_per_round, 1)
        _int_at_least("run.min_clients", run.min_clients, 1)
        if run.min_clients > run.clients_per_round:
            raise ConfigError(
                f"run.min_clients = {run.min_clients} is more than run.clients_per_round = "
                f"{run.clients_per_round}; no round could ever aggregate"
            )
        _real("run.client_timeout", run.client_timeout, lo=0.0, hint="0 disables the limit")
        _real("run.max_update_norm", run.max_update_norm, lo=0.0, hint="0 disables the bound")

        _int_at_least("clients.num_clients", cl.num_clients, 1)
        if run.clients_per_round > cl.num_clients:
            raise ConfigError(
                f"run.clients_per_round = {run.clients_per_round} is more than clients.num_clients = "
                f"{cl.num_clients}; lower it or add clients"
            )
        if not cl.levels or any(lv <= 0 for lv in cl.levels) or sorted(set(cl.levels)) != cl.levels:
            raise ConfigError(f"clients.levels = {cl.levels} must be positive, strictly increasing ranks")
        for i, lv in enumerate(cl.levels):
            _int_at_least(f"clients.levels[{i}]", lv, 1)
        bad_eval = [lv for lv in run.eval_levels if lv not in cl.levels]
        if bad_eval:
            raise ConfigError(f"run.eval_levels: {bad_eval} not in clients.levels {cl.levels}")
        if cl.ranks is not None:
            if len(cl.ranks) != cl.num_clients:
                raise ConfigError(
                    f"clients.ranks has {len(cl.ranks)} entries for {cl.num_clients} clients; "
                    "give one rank per client"
                )
            bad = [r for r in cl.ranks if r not in cl.levels]
            if bad:
                raise ConfigError(f"clients.ranks: rank(s) {bad} not in clients.levels {cl.levels}")

        lora = self.lora
        _real("lora.alpha", lora.alpha, lo=0.0, lo_open=True)
        _real("lora.dropout", lora.dropout, lo=0.0, hi=1.0, hi_open=True)
        empty = [i for i, m in enumerate(lora.target_modules) if not m.strip()]
        if empty:
            raise ConfigError(f"lora.target_modules[{empty[0]}] is empty; give module name suffixes")

        t = self.train
        _int_at_least("train.steps", t.steps, 1)
        _int_at_least("train.batch_size", t.batch_size, 1)
        _real("train.lr", t.lr, lo=0.0, lo_open=True)
        _real("train.weight_decay", t.weight_decay, lo=0.0)
        if t.own_weight not in ("equal", "geometric"):
            _real(
                "train.own_weight",
                float(t.own_weight),
                lo=0.0,
                hi=1.0,
                lo_open=True,
                hint='or "equal" or "geometric"',
            )
        if t.own_weight_final is not None:
            if t.own_weight in ("equal", "geometric"):
                raise ConfigError(
                    f"train.own_weight_final needs a numeric train.own_weight, got {t.own_weight!r}; "
                    "omit it or give own_weight a number"
                )
            _real("train.own_weight_final", t.own_weight_final, lo=0.0, hi=1.0, lo_open=True)
        _real("train.distill", t.distill, lo=0.0, hi=1.0, hint="0 disables self-distillation")
        if t.distill > 0 and t.nested_mode not in ("sandwich", "all"):
            raise ConfigError(
                f'train.distill = {t.distill!r} needs train.nested_mode = "sandwich" or "all" '
                f"(got {t.nested_mode!r}); set it to 0 or change the mode"
            )
        if t.max_grad_norm is not None:
            _real(
                "train.max_grad_norm", t.max_grad_norm, lo=0.0, lo_open=True, hint="omit it for no clipping"
            )

        if self.aggregation.order not in ("auto", "ownership") and spec.rule not in ORDER_RULES:
            raise ConfigError(
                f"aggregation.order = {self.aggregation.order!r} applies to the segment-wise methods "
                f"({', '.join(ORDER_RULES)}); run.method = {run.method!r} is not one (omit it)"
            )

        order = resolve_order(spec, self.aggregation.order)
        if self.train.factors == "b-only" and order == "round" and spec.rule in ORDER_RULES:
            raise ConfigError(
                'train.factors = "b-only" keeps A frozen, which aggregation.order = "round" rotates '
                f'(run.method = {run.method!r}); set aggregation.order = "ownership" or "export"'
            )

        h = self.hetlora
        _real("hetlora.gamma", h.gamma, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _real("hetlora.lam", h.lam, lo=0.0)
        if h.min_rank is not None:
            _int_at_least("hetlora.min_rank", h.min_rank, 1)
            if h.min_rank > self.max_rank:
                raise ConfigError(
                    f"hetlora.min_rank = {h.min_rank} is above the largest rank level {self.max_rank}; "
                    "lower it (or omit it: the smallest level)"
                )

        s = self.synthetic
        for key in ("d_in", "hidden", "d_out", "teacher_rank", "min_examples", "test_examples"):
            _int_at_least(f"synthetic.{key}", getattr(s, key), 1)
        if s.max_examples < s.min_examples:
            raise ConfigError(
                f"synthetic.max_examples = {s.max_examples} is below synthetic.min_examples = "
                f"{s.min_examples}; raise it"
            )
        _int_at_least("synthetic.max_examples", s.max_examples, 1)
        _real("synthetic.teacher_scale", s.teacher_scale, lo=0.0, lo_open=True)
        _real("synthetic.spectrum_decay", s.spectrum_decay, lo=0.0, hi=1.0, lo_open=True)
        _real("synthetic.input_shift", s.input_shift, lo=0.0)
        if s.data_seed is not None:
            _seed("synthetic.data_seed", s.data_seed)

        llm = self.llm
        if not llm.model.strip():
            raise ConfigError("llm.model is empty; give an alias (smollm2-135m), a model folder or a hub id")
        _int_at_least("llm.max_per_task", llm.max_per_task, 0, hint="0: all")
        _int_at_least("llm.max_examples", llm.max_examples, 0, hint="0: all")
        for key in ("max_chars", "tasks_per_client", "test_examples", "max_length", "max_new_tokens"):
            _int_at_least(f"llm.{key}", getattr(llm, key), 1)
        _int_at_least("llm.eval_batch_size", llm.eval_batch_size, 1)
        _real("llm.dirichlet_alpha", llm.dirichlet_alpha, lo=0.0, lo_open=True)
        if llm.max_examples and llm.test_examples >= llm.max_examples:
            raise ConfigError(
                f"llm.test_examples = {llm.test_examples} leaves no training examples out of "
                f"llm.max_examples = {llm.max_examples}; raise llm.max_examples (or 0: all)"
            )
        if llm.data_seed is not None:
            _seed("llm.data_seed", llm.data_seed)
        if self.workload.kind == "llm" and llm.source != "bbc-news" and not llm.path:
            raise ConfigError(
                f"llm.path is required for llm.source = {llm.source!r} (a file, folder or hub id)"
            )
        if self.privacy is not None:
            self.privacy.validate(spec.rule, run.method, run.clients_per_round)


SUM_RULES = ("prelort", "segment", "fedit")
"""Aggregation rules that are a ratio of sums (docs/design.md §4.9): [privacy] works with them."""

_INT_MAX = 2**63 - 1  # TOML integers are 64-bit; so are the seeds torch and numpy take


def _int_at_least(key: str, value: int, lo: int, hint: str = "") -> None:
    """``value`` is an integer in [lo, 2^63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _INT_MAX:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{key} = {value!r} must be {what}{'; ' + hint if hint else ''}")


def _positive(key: str, value: int) -> None:
    _int_at_least(key, value, 1)


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


# -- parsing -----------------------------------------------------------------------------------
def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(
                f"unknown key {full!r}; valid keys{' in [' + prefix + ']' if prefix else ''}: "
                f"{', '.join(sorted(names))}"
            )
        kwargs[key] = _check_value(full, value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); value parsed as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set run.rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from a TOML-shaped dict and ``key=value`` overrides."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    cfg: Config = _build(Config, merged)
    cfg.validate()
    # resolved once here, so the saved config.toml names the data seed a run used
    if cfg.synthetic.data_seed is None:
        cfg.synthetic.data_seed = cfg.run.seed
    if cfg.llm.data_seed is None:
        cfg.llm.data_seed = cfg.run.seed
    if cfg.hetlora.min_rank is None:
        cfg.hetlora.min_rank = min(cfg.clients.levels)
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config file (or defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing TOML file to --config")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a plain dict (None values dropped, as TOML has no null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        return obj

    out: dict[str, Any] = clean(dataclasses.asdict(cfg))
    return out


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for the resolved config (tables of scalars and lists)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {fmt(v)}")
        lines.append("")
    return "\n".join(lines)


def same_config(stored: Any, current: dict[str, Any], unused: typing.AbstractSet[str] = frozenset()) -> bool:
    """Whether a finished run's stored config is ``current``: every key it stored is equal.

    Keys added to the config after the run was made are not in ``stored`` and are taken to
    have had their default, so finished results stay reusable across versions. Keys in
    ``unused`` (``section.key``, the keys the run's method never reads:
    ``federation.methods.unused_keys``) may differ.
    """
    if not isinstance(stored, dict):
        return False
    for section, values in stored.items():
        now = current.get(section)
        if not isinstance(values, dict) or not isinstance(now, dict):
            return False
        for key, value in values.items():
            if f"{section}.{key}" in unused:
                continue
            if key not in now or now[key] != value:
                return False
    return True
