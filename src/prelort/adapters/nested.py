"""A rank-R LoRA on any torch model whose rank-r prefix can be switched on without copies.

Built on PEFT: ``peft.inject_adapter_in_model`` wraps each target ``nn.Linear`` in PEFT's
``LoraLayer`` (so the weights keep PEFT's names, layout and initialisation), and a forward
hook on each ``lora_A`` zeroes the rank dimensions >= r of ``A x``. The layer then computes

    y = W x + s(r) * B[:, :r] @ A[:r] @ x,

the exact output of a plain rank-r PEFT LoRA built from the sliced weights, and no gradient
reaches A[r:] or B[:, r:] (their inputs/outputs are multiplied by zero).

``set_dim_weights(w)`` (off by default) makes the same hook a soft mask: the layer computes
``W x + s(r) * B diag(w) A x`` with ``w_i = 0`` for ``i >= r`` (MatryoshkaLoRA's one-pass
training, ``prelort.training.local``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from prelort.adapters.state import Adapter, LoRAPair, Scaling

ADAPTER_NAME = "default"


class NestedLoRA:
    """Nested LoRA adapters of maximum rank R on ``model``'s target linear modules.

    Parameters
    ----------
    model:
        Any torch module; it is modified in place (targets wrapped by PEFT).
    target_modules:
        Module name suffixes or a regex, as PEFT's ``target_modules``.
    scaling:
        s(r) for the active truncation (``Scaling.max_rank`` is R).
    dropout:
        LoRA dropout on the adapter input.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str] | str,
        scaling: Scaling,
        *,
        dropout: float = 0.0,
    ) -> None:
        self.scaling = scaling
        self.max_rank = scaling.max_rank
        targets: list[str] | str = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(
            r=self.max_rank,
            lora_alpha=scaling.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
            target_modules=targets,
            lora_dropout=dropout,
            bias="none",
        )
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError as exc:
            raise ValueError(f"no LoRA target matched {targets!r}: {exc}") from exc
        self.layers: dict[str, LoraLayer] = {
            name: module for name, module in self.model.named_modules() if isinstance(module, LoraLayer)
        }
        if not self.layers:
            raise ValueError(f"no module of the model matches target_modules={targets!r}")
        for p in self.model.parameters():  # training switches the adapter factors on
            p.requires_grad_(False)
        self._rank = self.max_rank
        self._base_weights: dict[str, torch.Tensor] = {}
        self._offset: set[str] = set()
        """Modules whose base weights currently differ from W0 by a delta."""
        self._masks: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
        self._dim_weights: torch.Tensor | None = None
        for layer in self.layers.values():
            layer.lora_A[ADAPTER_NAME].register_forward_hook(self._mask_hook)
        self.set_rank(self.max_rank)

    # -- truncation -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The active truncation r."""
        return self._rank

    def set_rank(self, r: int) -> None:
        """Activate the rank-r prefix: A[:r], B[:, :r] with scale s(r)."""
        if not 0 < r <= self.max_rank:
            raise ValueError(f"rank {r} outside 1..{self.max_rank}")
        self._rank = r
        s = self.scaling(r)
        for layer in self.layers.values():
            layer.scaling[ADAPTER_NAME] = s

    @property
    def dim_weights(self) -> torch.Tensor | None:
        """The per-rank-dimension weights w (length R, fp64), or None when off."""
        return None if self._dim_weights is None else self._dim_weights.clone()

    def set_dim_weights(self, weights: Sequence[float] | torch.Tensor | None) -> None:
        """Scale rank dimension i of ``A x`` by ``weights[i]`` (None: off, the default).

        With weights w the layer computes ``W x + s(r) * B diag(w) A x``; dimensions >= r and
        those beyond ``len(weights)`` get weight 0. Gradients reach dimension i scaled by w_i.
        """
        self._masks.clear()
        if weights is None:
            self._dim_weights = None
            return
        w = torch.as_tensor(weights, dtype=torch.float64).detach().reshape(-1).cpu()
        if w.numel() > self.max_rank or not bool(torch.isfinite(w).all()):
            raise ValueError(f"dim weights must be at most {self.max_rank} finite numbers, got {w.tolist()}")
        full = torch.zeros(self.max_rank, dtype=torch.float64)
        full[: w.numel()] = w
        self._dim_weights = full

    def _mask_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        r = self._rank
        weights = self._dim_weights
        if r == self.max_rank and weights is None:
            return None
        key = (output.device, output.dtype, r)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(self.max_rank, device=output.device, dtype=output.dtype)
            if weights is None:
                mask[:r] = 1
            else:
                mask[:r] = weights[:r].to(device=output.device, dtype=output.dtype)
            self._masks[key] = mask
        return output * mask  # (..., R): rank dims >= r contribute nothing

    # -- parameters -------------------------------------------------------------------------
    def factor(self, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """The live (A, B) parameters of module ``name``: A (R, in), B (out, R)."""
        layer = self.layers[name]
        A = cast(nn.Parameter, cast(nn.Linear, layer.lora_A[ADAPTER_NAME]).weight)
        B = cast(nn.Parameter, cast(nn.Linear, layer.lora_B[ADAPTER_NAME]).weight)
        return A, B

    def parameters_with_rank_dim(self) -> Iterator[tuple[torch.nn.Parameter, int]]:
        """Every adapter parameter with the index of its rank dimension (A: 0, B: 1)."""
        for name in self.layers:
            A, B = self.factor(name)
            yield A, 0
            yield B, 1

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every target module."""
        out: dict[str, tuple[int, int]] = {}
        for name in self.layers:
            A, B = self.factor(name)
            out[name] = (int(B.shape[0]), int(A.shape[1]))
        return out

    def get_adapter(self, r: int | None = None) -> Adapter:
        """Detached fp32 copies of the rank-r prefix (default: the active rank)."""
        r = self._rank if r is None else r
        if not 0 < r <= self.max_rank:
            raise ValueError(f"rank {r} outside 1..{self.max_rank}")
        out: Adapter = {}
        for name in self.layers:
            A, B = self.factor(name)
            out[name] = LoRAPair(
                A[:r].detach().to(torch.float32).clone(),
                B[:, :r].detach().to(torch.float32).clone(),
            )
        return out

    @torch.no_grad()
    def set_adapter(self, adapter: Adapter) -> None:
        """Load a prefix adapter (every module, one rank r); rank dims >= r are zeroed."""
        if set(adapter) != set(self.layers):
            missing = sorted(set(self.layers) - set(adapter))
            extra = sorted(set(adapter) - set(self.layers))
            raise ValueError(
                f"adapter modules do not match the model (missing {missing}, unexpected {extra})"
            )
        for name, pair in adapter.items():
            A, B = self.factor(name)
            r = pair.rank
            if r > self.max_rank or pair.A.shape[1] != A.shape[1] or pair.B.shape[0] != B.shape[0]:
                raise ValueError(
                    f"module {name}: adapter A{tuple(pair.A.shape)} B{tuple(pair.B.shape)} does not fit "
                    f"A{tuple(A.shape)} B{tuple(B.shape)}"
                )
            A.zero_()
            B.zero_()
            A[:r].copy_(pair.A)
            B[:, :r].copy_(pair.B)

    @torch.no_grad()
    def set_base(self, deltas: dict[str, torch.Tensor] | None) -> None:
        """W <- W0 + dW for the modules in ``deltas`` and W <- W0 for every other module an
        earlier call offset: afterwards the base is exactly W0 + ``deltas``, whatever came before
        (a downlink's ``base``: FLoRA's merged updates, Fed-PLoRA's fold)."""
        deltas = deltas or {}
        for name in sorted(self._offset - set(deltas)):
            cast(nn.Linear, self.layers[name].get_base_layer()).weight.copy_(self._base_weights[name])
        if deltas:
            self.set_base_delta(deltas)
        self._offset = set(deltas)

    @torch.no_grad()
    def set_base_delta(self, deltas: dict[str, torch.Tensor]) -> None:
        """W <- W0 + dW for each named module (FLoRA's merged updates, dW accumulated).

        W0 is kept from the first call, so the weights depend only on the accumulated dW,
        not on the order of merges: a resumed run gets bit-identical weights.
        """
        for name, delta in deltas.items():
            weight = cast(nn.Linear, self.layers[name].get_base_layer()).weight
            original = self._base_weights.get(name)
            if original is None:
                original = self._base_weights[name] = weight.detach().clone()
            weight.copy_(original + delta.to(device=weight.device, dtype=weight.dtype))
            self._offset.add(name)
