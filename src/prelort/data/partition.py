"""Splitting examples among clients (IID and non-IID) and holding out a test split.

Partitioning uses Flower Datasets' partitioners on a small in-memory
``datasets.Dataset`` with columns ``category`` and ``idx``, and maps each partition
back to positions in the caller's list. Schemes, chosen by name from
:data:`PARTITION_SCHEMES`:

- ``iid``: a seeded shuffle, then ``IidPartitioner`` (equal contiguous shards);
- ``dirichlet``: ``DirichletPartitioner`` over the category (Hsu et al. 2019,
  "Measuring the effects of non-identical data distribution"): for each category,
  client shares p ~ Dir(alpha * 1); small alpha gives a few categories per client;
- ``task``: each client holds at most ``tasks_per_client`` categories
  (``PathologicalPartitioner``, the label-skew split of McMahan et al. 2017). With at
  least as many clients as categories, each category is shared by the clients holding
  it; with fewer, whole categories are dealt round-robin to clients.

Every position lands in exactly one client, and the split depends only on the seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from prelort.data.examples import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class _Request:
    categories: list[str]
    num_clients: int
    alpha: float
    tasks_per_client: int
    min_partition_size: int | None
    seed: int


PartitionScheme = Callable[[_Request], list[list[int]]]
_DIRICHLET_RESTARTS = 10


def _dataset(categories: Sequence[str], **extra: list[int]) -> Dataset:
    from datasets import Dataset

    columns = {"category": list(categories), "idx": list(range(len(categories))), **extra}
    return Dataset.from_dict(columns)


def _run(partitioner: Partitioner, dataset: Dataset, num_clients: int) -> list[list[int]]:
    """Positions (the ``idx`` column) of every partition, each sorted."""
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            # Dirichlet resampling warns on each retry; a final failure raises anyway.
            warnings.simplefilter("ignore", UserWarning)
            parts = [sorted(partitioner.load_partition(i)["idx"]) for i in range(num_clients)]
    except ValueError as err:
        raise DataError(f"partitioning failed: {str(err).splitlines()[0]}") from None
    return [[int(i) for i in part] for part in parts]


def _iid(request: _Request) -> list[list[int]]:
    from flwr_datasets.partitioner import IidPartitioner

    shuffled = _dataset(request.categories).shuffle(seed=request.seed)
    return _run(IidPartitioner(request.num_clients), shuffled, request.num_clients)


def _dirichlet(request: _Request) -> list[list[int]]:
    if request.alpha <= 0:
        raise DataError(f"alpha must be positive, got {request.alpha}")
    n, k = len(request.categories), request.num_clients
    if request.min_partition_size is not None:
        if request.min_partition_size * k > n:
            raise DataError(
                f"min_partition_size={request.min_partition_size} for {k} clients needs "
                f"{request.min_partition_size * k} examples, there are {n}"
            )
        return _dirichlet_draw(request, request.min_partition_size)
    # Default: up to 10 examples per client when the data allow it, relaxed (halved, down
    # to 1) when small alpha with many clients makes that unlikely to be drawn.
    min_size = max(1, min(10, n // (4 * k)))
    while True:
        try:
            return _dirichlet_draw(request, min_size)
        except DataError:
            if min_size == 1:
                raise
            min_size //= 2


def _dirichlet_draw(request: _Request, min_size: int) -> list[list[int]]:
    """DirichletPartitioner draws until every client has ``min_size`` examples.

    It gives up after 10 draws; small alpha with many clients can need more, so it is
    restarted with seeds derived from (seed, attempt): the result depends on the seed only.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    k = request.num_clients
    dataset = _dataset(request.categories)
    for attempt in range(_DIRICHLET_RESTARTS):
        partitioner = DirichletPartitioner(
            num_partitions=k,
            partition_by="category",
            alpha=request.alpha,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=request.seed if attempt == 0 else _derived_seed(request.seed, attempt),
        )
        try:
            return _run(partitioner, dataset, k)
        except DataError:
            continue
    raise DataError(
        f"dirichlet partitioning with alpha={request.alpha} could not give each of {k} "
        f"clients {min_size}+ examples in {10 * _DIRICHLET_RESTARTS} draws; "
        + (
            "raise alpha or lower num_clients"
            if min_size == 1
            else "raise alpha, lower num_clients or min_partition_size"
        )
    )


def _derived_seed(seed: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


def _task(request: _Request) -> list[list[int]]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    k, per_client = request.num_clients, request.tasks_per_client
    if per_client < 1:
        raise DataError(f"tasks_per_client must be at least 1, got {per_client}")
    unique = sorted(set(request.categories))
    num_categories = len(unique)
    # A seeded order of the categories decides which client gets which.
    order = [unique[j] for j in np.random.default_rng(request.seed).permutation(num_categories)]
    rank = {category: position for position, category in enumerate(order)}

    if k >= num_categories:
        # Client p gets categories p, p+1, ..., p+m-1 (mod C) of the seeded order, each
        # category split evenly among the clients that hold it; every category is used.
        labels = [rank[c] for c in request.categories]
        classes_per_client = min(per_client, num_categories)
    elif k * per_client >= num_categories:
        # Fewer clients than categories: whole categories dealt round-robin, so client p
        # holds group p = {categories at positions p, p + k, ...} (<= ceil(C / k) of them).
        labels = [rank[c] % k for c in request.categories]
        classes_per_client = 1
    else:
        raise DataError(
            f"task partitioning: {k} clients x {per_client} tasks_per_client cannot hold all "
            f"{num_categories} categories; set tasks_per_client >= {-(-num_categories // k)} "
            "or select fewer categories"
        )
    partitioner = PathologicalPartitioner(
        num_partitions=k,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=request.seed,
    )
    try:
        return _run(partitioner, _dataset(request.categories, label=labels), k)
    except DataError:
        raise DataError(
            f"task partitioning: some category has fewer examples than the clients that "
            f"hold it ({k} clients x {per_client} tasks over {num_categories} categories); "
            "use fewer clients or a smaller tasks_per_client"
        ) from None


PARTITION_SCHEMES: dict[str, PartitionScheme] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "task": _task,
}
"""Partition schemes by name."""


def partition_indices(
    categories: Sequence[str],
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    tasks_per_client: int = 2,
    min_partition_size: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Split positions ``0 .. len(categories) - 1`` among ``num_clients`` clients.

    Parameters
    ----------
    categories:
        The category (label, task) of every example; non-IID schemes split by it.
    num_clients:
        Number of clients; each gets at least one example.
    scheme:
        ``iid``, ``dirichlet`` or ``task`` (see the module docstring).
    alpha:
        Dirichlet concentration (``dirichlet``); smaller is more skewed.
    tasks_per_client:
        Most categories one client holds (``task``).
    min_partition_size:
        Smallest client for ``dirichlet`` (redrawn until met, at most 100 draws).
        None: ``max(1, min(10, n // (4 * num_clients)))``, halved while that fails.
    seed:
        The split depends only on this seed.

    Returns
    -------
    One sorted list of positions per client; every position is in exactly one list.
    """
    make = PARTITION_SCHEMES.get(scheme)
    if make is None:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(PARTITION_SCHEMES)}")
    n = len(categories)
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise DataError(f"cannot split {n} examples among {num_clients} clients; use fewer clients")
    request = _Request(
        categories=[str(c) for c in categories],
        num_clients=num_clients,
        alpha=float(alpha),
        tasks_per_client=tasks_per_client,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    parts = make(request)
    sizes = [len(part) for part in parts]
    if sum(sizes) != n or len({i for part in parts for i in part}) != n:
        raise DataError(f"{scheme} partitioning did not place every example exactly once")
    if min(sizes) == 0:
        raise DataError(f"{scheme} partitioning left a client with no examples; use fewer clients")
    return parts


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of positions ``0 .. n - 1`` into (train, test), each sorted.

    The test split is held out from every client. Its size is
    ``round(n * test_fraction)``, at least 1 when ``test_fraction > 0``.
    """
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    num_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - num_test < 1:
        raise DataError(
            f"cannot hold out {num_test} of {n} examples and keep any for training; "
            "lower test_fraction or add data"
        )
    order = np.random.default_rng(seed).permutation(n)
    test = sorted(int(i) for i in order[:num_test])
    train = sorted(int(i) for i in order[num_test:])
    return train, test
