"""Fed-PLoRA: parallel one-rank modules with Select-N-Fold (Zhang, Hu, Xu, ICLR 2026).

Zhang et al., "Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation",
ICLR 2026 (arXiv 2602.16936). Sources actually read for this file: the paper's abstract and a
public summary of its method section (PLoRA, Select-N-Fold, initialization and aggregation
noise). The full text, hence its section and equation numbers, and the authors' repository
(TNI-playground/Fed-PLoRA) could not be obtained here, so nothing below is checked against
their code or equations; "method: ..." names the part of the method each step implements.
Where the text was not available we implement the most faithful reading and say so.

**PLoRA** (method: Parallel One-Rank Adaptation). The rank-R LoRA of a module is read as R
parallel one-rank modules,

    dW = s(R) * sum_{j<R} b_j a_j^T,    b_j = B[:, j],  a_j^T = A[j],

which is mathematically the same adapter (same tensors, same layout, same initialisation:
a_j random, b_j = 0), so the global adapter is stored exactly like every other rule's.

**Select-N-Fold** (method: Select-N-Fold). In round t client k of rank r_k selects N = r_k
of the R modules, S_k(t), trains only those, and *folds* the others into its frozen weights
before training:

    W_k = W0 + s(R) * sum_{j not in S_k(t)} b_j a_j^T          (fold)
    model_k = W_k + s(R) * sum_{j in S_k(t)} b_j a_j^T = W0 + dW   (unchanged: zero init noise)

Selection (our reading: a fresh random selection every round; the authors' rule could not
be checked): S_k(t) uniformly without replacement, the first r_k entries of a random
permutation of 0..R-1 from a generator seeded by (seed, "select", t, k) (``derive_seed``), so
the server recomputes it to map each update back, any process gets the same choice, and a
resumed run is bit-identical (no RNG state).

**What travels.** Downlink: the selected modules, permuted to the front in selection order
(A[S], B[:, S]) as a rank-r_k adapter; its B is rescaled by s(R)/s(r_k) so that the client,
which trains the rank-r_k truncation at scale s(r_k) (``NestedLoRA``), applies exactly
s(R) b_j a_j^T (the ratio is 1 under the default ``fixed`` scaling). Fold: computed by the
client from the R - r_k unselected modules it also downloads, so a client downloads all R
modules, 4 R (in + out) bytes per module (``Fold.num_bytes`` counts the unselected factors;
the dense fold never needs to travel). Upload: its r_k trained modules, 4 r_k (in + out).
On Flower the wire carries the dense per-client fold in the BASE_DELTA record instead
(reported as ``wire_bytes_down``), as for FLoRA's merged delta.

**Aggregation** (method: server aggregation). Each module is averaged over the clients that
trained it this round, weighted by their data sizes n_k (FedAvg within the module's trainers):

    a_j = sum_{k: j in S_k} n_k a_j^(k) / sum_{k: j in S_k} n_k,   likewise b_j,

and a module no client of the round trained keeps its value. Our reading: each one-rank
module's factors are averaged (b and a separately), which leaves the small aggregation noise
the paper acknowledges (cross terms between trainers of the same module; it claims reduced,
not zero, aggregation noise) but no dilution by non-trainers; the weights are n_k (FedAvg
within the trainers), as the paper's exact weights could not be checked.

**What a rank-r client holds, and per-rank evaluation.** Every client always works on the
full model W0 + dW (the fold makes the untrained modules part of its frozen weights), so the
model of a rank-r client is the folded full model, the same at every level: family
``merged``. ``downlink(global, r)`` without a client id returns modules 0..r-1 and ``fold``
the others, so evaluation at level r scores exactly W0 + dW. ``prelort export`` can write only
rank R (all modules; no fold), which is the whole model.

Deviation: local training uses this project's optimiser and budget (``train.*``) like every
other method; no Fed-PLoRA-specific local hyperparameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prelort.adapters.state import Adapter, LoRAPair, adapter_num_bytes
from prelort.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    Fold,
    check_updates,
    register,
)
from prelort.seeding import generator_for


def select_modules(seed: int, round_: int, client_id: int, rank: int, max_rank: int) -> list[int]:
    """S_k(t): the first ``rank`` entries of a permutation of 0..R-1 seeded by (seed, "select",
    round, client). A prefix of the same permutation for a smaller rank, so the rows of an
    update of lower rank still map to the modules it was sent."""
    perm = torch.randperm(max_rank, generator=generator_for(seed, "select", round_, client_id))
    return [int(j) for j in perm[:rank]]


@register("fed-plora")
class FedPLoRA(AggregationRule):
    """Select-N-Fold downlinks and per-module averaging over each module's trainers."""

    name = "fed-plora"

    def selection(self, max_rank: int, rank: int, client_id: int | None, round_: int | None) -> list[int]:
        """The modules a client of ``rank`` trains; 0..rank-1 without a client, round or seed
        (evaluation, export, and rules used outside a run)."""
        seed = self.options.seed
        if client_id is None or round_ is None or seed is None:
            return list(range(rank))
        return select_modules(seed, round_, client_id, rank, max_rank)

    def downlink(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Adapter:
        """The selected modules permuted to the front, B rescaled from s(R) to s(rank)."""
        out: Adapter = {}
        for name, pair in global_adapter.items():
            idx = self.selection(pair.rank, rank, client_id, round_)
            ratio = self.options.scale(pair.rank) / self.options.scale(rank)
            out[name] = LoRAPair(pair.A[idx].clone(), pair.B[:, idx] * ratio)
        return out

    def fold(
        self, global_adapter: Adapter, rank: int, *, client_id: int | None = None, round_: int | None = None
    ) -> Fold | None:
        """s(R) * sum of the unselected modules b_j a_j^T per module (fp32); None at rank R."""
        delta: dict[str, torch.Tensor] = {}
        rest: Adapter = {}
        for name, pair in global_adapter.items():
            chosen = set(self.selection(pair.rank, rank, client_id, round_))
            idx = [j for j in range(pair.rank) if j not in chosen]
            if not idx:
                return None
            rest[name] = LoRAPair(pair.A[idx], pair.B[:, idx])
            delta[name] = rest[name].delta(self.options.scale(pair.rank)).float()
        return Fold(delta, adapter_num_bytes(rest))

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> AggregationResult:
        max_rank = check_updates(global_adapter, updates)
        rows = [self.selection(max_rank, u.rank, u.client_id, self.options.round) for u in updates]
        back = [self.options.scale(u.rank) / self.options.scale(max_rank) for u in updates]
        out: Adapter = {}
        for name, g in global_adapter.items():
            num_A = torch.zeros(g.A.shape, dtype=torch.float64)
            num_B = torch.zeros(g.B.shape, dtype=torch.float64)
            den = torch.zeros(max_rank, dtype=torch.float64)
            for u, idx, ratio in zip(updates, rows, back, strict=True):
                n, pair = float(u.num_examples), u.adapter[name]
                num_A[idx] += n * pair.A.double()
                num_B[:, idx] += n * ratio * pair.B.double()
                den[idx] += n
            trained = den > 0
            safe = torch.where(trained, den, torch.ones_like(den))
            A = torch.where(trained[:, None], num_A / safe[:, None], g.A.double())
            B = torch.where(trained[None, :], num_B / safe[None, :], g.B.double())
            out[name] = LoRAPair(A.to(g.A.dtype), B.to(g.B.dtype))
        return AggregationResult(out)
