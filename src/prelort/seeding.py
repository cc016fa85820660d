"""Seeds derived from a run's seed and a purpose: the same in every process and platform.

Every random draw of a run (rank assignment, client sampling, initialisation, local batches,
rule-internal randomness, seeded DP noise) is seeded by ``derive_seed(seed, purpose, ...)``
(docs/design.md, "Randomness"), so a resumed run or another process (a Flower ClientApp)
draws what an uninterrupted in-process run draws. A bottom module: it imports nothing from
PreLort, and torch only when ``generator_for`` is called.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (same in every process and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator_for(*parts: int | str) -> torch.Generator:
    """A torch generator seeded by ``derive_seed(*parts)``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))
