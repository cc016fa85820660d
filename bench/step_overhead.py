"""Local step overhead: a PreLort client step vs a plain PEFT LoRA step (issue #6, item 1).

    python bench/step_overhead.py                      # SmolLM2-135M, writes bench/results/step_overhead.json
    python bench/step_overhead.py --random-init --device cuda --dtype bfloat16 --out ...gpu.json

Same model (two copies of SmolLM2-135M), same batch (B x T tokens, loss on the second half),
LoRA rank R = 16 on q_proj and v_proj, lr 1e-4:

- ``peft``: ``peft.get_peft_model`` + ``torch.optim.AdamW``; a step is forward, backward,
  ``opt.step()``, ``opt.zero_grad()``;
- ``prelort_sample``: ``prelort.training.train_local`` in ``sample`` mode (client rank R,
  levels {2, 4, 8, 16}, own weight 0.5): each step draws one level, trains that truncation
  with the masking hook and steps ``MaskedAdamW`` on its prefix;
- ``peft_answer_loss``: the ``peft`` step with ``prelort.training.answer_loss`` (the LLM
  workload's loss: LM head and softmax on answer positions only) instead of transformers'
  full-logits loss;
- ``prelort_plain``: ``train_local`` in ``plain`` mode at r = R (isolates hook + MaskedAdamW);
- ``prelort_all``: ``train_local`` in ``all`` mode, |L_k| = 4 passes per step; its cost per
  level is reported, and a prototype ``stacked`` variant that runs the |L_k| truncations as
  one batch of |L_k| x B rows (per-row rank masks, one forward/backward) — the gradient is
  the same weighted sum, checked here.

Each repetition times ``--steps`` steps of every variant in turn (interleaved, so machine
load hits all variants alike); the median over ``--reps`` repetitions is reported per step.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_lm, machine, median_time, write_json
from prelort.adapters import NestedLoRA, Scaling
from prelort.training import LocalTrainConfig, answer_loss, train_local
from prelort.training.local import level_distribution

TARGETS = ["q_proj", "v_proj"]
LEVELS = [2, 4, 8, 16]


def make_batch(vocab: int, B: int, T: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 2] = -100  # loss on the answer half only, as in instruction tuning
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss: torch.Tensor = model(**batch).loss
    return loss


def randomise_b(params: list[torch.nn.Parameter]) -> None:
    """Non-zero B so every gradient is non-trivial (PEFT initialises B = 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def stacked_all_step(
    nested: NestedLoRA, batch: dict[str, torch.Tensor], dist: dict[int, float]
) -> torch.Tensor:
    """One ``all``-mode objective sum_l c_l loss_l as a single pass over |L| x B rows.

    Row group g runs truncation l_g: the output of every ``lora_A`` is multiplied per row by
    m_g = (s(l_g) / s(R)) * 1[j < l_g], which is exactly the rank-l_g forward. The loss of
    each group is its own mean token NLL, as ``loss_fn`` computes it, so the gradient equals
    the sequential sum of the |L| weighted backward passes.
    """
    levels = list(dist)
    n, B = len(levels), batch["input_ids"].shape[0]
    R = nested.max_rank
    dev = batch["input_ids"].device
    ids = batch["input_ids"].repeat(n, 1)
    att = batch["attention_mask"].repeat(n, 1)
    labels = batch["labels"].repeat(n, 1)
    scale = torch.tensor([nested.scaling(lv) / nested.scaling(R) for lv in levels], device=dev)
    keep = (torch.arange(R, device=dev)[None, :] < torch.tensor(levels, device=dev)[:, None]).float()
    row_mask = (keep * scale[:, None]).repeat_interleave(B, dim=0)  # (n*B, R)
    nested.set_rank(R)  # the built-in hook is a no-op at R; ours applies per-row ranks

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * row_mask.to(output.dtype)[:, None, :]

    handles = [layer.lora_A["default"].register_forward_hook(hook) for layer in nested.layers.values()]
    try:
        logits = nested.model(input_ids=ids, attention_mask=att).logits.float()
    finally:
        for h in handles:
            h.remove()
    tgt = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(n * B, -1)
    valid = (tgt != -100).float()
    total = torch.zeros((), device=dev)
    for g, lv in enumerate(levels):
        rows = slice(g * B, (g + 1) * B)
        total = total + dist[lv] * nll[rows].sum() / valid[rows].sum()
    total.backward()  # type: ignore[no-untyped-call]
    return total.detach()


def sequential_all_grads(
    nested: NestedLoRA, batch: dict[str, torch.Tensor], dist: dict[int, float]
) -> list[torch.Tensor]:
    for p, _ in nested.parameters_with_rank_dim():
        p.grad = None
    for lv, c in dist.items():
        nested.set_rank(lv)
        (lm_loss(nested.model, batch) * c).backward()  # type: ignore[no-untyped-call]
    return [p.grad.clone() for p, _ in nested.parameters_with_rank_dim() if p.grad is not None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-init", action="store_true", help="random weights from the model's config")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--all-reps", type=int, default=3)
    p.add_argument("--out", default="bench/results/step_overhead.json")
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model

    base, _ = load_lm(args.model, random_init=args.random_init, dtype=args.dtype, device=args.device)
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    sync = device.type == "cuda"
    R = args.rank
    batch = make_batch(int(base.config.vocab_size), args.batch, args.seq, device)
    levels = [lv for lv in LEVELS if lv <= R]

    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS, lora_dropout=0.0, bias="none"),
    )
    peft_params = [q for q in peft_model.parameters() if q.requires_grad]
    randomise_b([q for n, q in peft_model.named_parameters() if "lora_B" in n])
    adamw = torch.optim.AdamW(peft_params, lr=1e-4)
    peft_model.train()

    nested = NestedLoRA(base, TARGETS, Scaling("fixed", 2.0 * R, R))
    randomise_b([q for q, d in nested.parameters_with_rank_dim() if d == 1])
    gen = torch.Generator().manual_seed(0)

    def peft_steps(loss_fn: Any = lm_loss) -> None:
        for _ in range(args.steps):
            loss_fn(peft_model, batch).backward()
            adamw.step()
            adamw.zero_grad()

    def prelort_steps(mode: str, steps: int) -> None:
        cfg = LocalTrainConfig(steps=steps, lr=1e-4, mode=mode, own_weight=0.5)  # type: ignore[arg-type]
        train_local(nested, R, levels, itertools.repeat(batch), lm_loss, cfg, gen)

    dist = level_distribution(R, levels, 0.5)
    params = [q for q, _ in nested.parameters_with_rank_dim()]

    def stacked_steps(steps: int) -> None:
        from prelort.training.optim import MaskedAdamW

        opt = MaskedAdamW(list(nested.parameters_with_rank_dim()), lr=1e-4)
        for q in params:
            q.requires_grad_(True)
        nested.model.train()
        for _ in range(steps):
            opt.zero_grad()
            stacked_all_step(nested, batch, dist)
            opt.step(R)
        for q in params:
            q.requires_grad_(False)
            q.grad = None
        nested.model.eval()

    # correctness of the stacked prototype: same gradient as |L| sequential passes
    for q in params:
        q.requires_grad_(True)
    nested.model.train()
    seq_grads = sequential_all_grads(nested, batch, dist)
    for q in params:
        q.grad = None
    stacked_all_step(nested, batch, dist)
    stk_grads = [q.grad.clone() for q in params if q.grad is not None]
    max_rel = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(stk_grads, seq_grads, strict=True)
    )
    for q in params:
        q.requires_grad_(False)
        q.grad = None
    nested.model.eval()
    print(f"stacked vs sequential all-mode gradient: max relative difference {max_rel:.2e}", flush=True)

    # warm-up (allocator, kernels)
    peft_steps()
    prelort_steps("sample", args.steps)
    per_step: dict[str, list[float]] = {
        "peft": [],
        "prelort_sample": [],
        "prelort_plain": [],
        "prelort_all": [],
        "prelort_all_stacked": [],
        "peft_answer_loss": [],
    }
    for rep in range(args.reps):
        per_step["peft"].append(median_time(peft_steps, 1, sync=sync)[0] / args.steps)
        per_step["prelort_sample"].append(
            median_time(lambda: prelort_steps("sample", args.steps), 1, sync=sync)[0] / args.steps
        )
        per_step["prelort_plain"].append(
            median_time(lambda: prelort_steps("plain", args.steps), 1, sync=sync)[0] / args.steps
        )
        per_step["peft_answer_loss"].append(
            median_time(lambda: peft_steps(answer_loss), 1, sync=sync)[0] / args.steps
        )
        if rep < args.all_reps:
            per_step["prelort_all"].append(median_time(lambda: prelort_steps("all", 2), 1, sync=sync)[0] / 2)
            per_step["prelort_all_stacked"].append(median_time(lambda: stacked_steps(2), 1, sync=sync)[0] / 2)
        print({k: round(v[-1], 4) for k, v in per_step.items() if v}, flush=True)

    # optimiser alone: MaskedAdamW (as train_local uses it) vs torch AdamW, same parameter shapes
    from prelort.training.optim import MaskedAdamW

    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    for q in peft_params:
        q.grad = torch.randn_like(q) * 1e-3
    masked = MaskedAdamW(list(nested.parameters_with_rank_dim()), lr=1e-4)
    opt_masked = median_time(lambda: masked.step(R // 2), 20, sync=sync)[0]
    opt_torch = median_time(adamw.step, 20, sync=sync)[0]
    for q in params + peft_params:
        q.grad = None

    import statistics

    med = {k: statistics.median(v) for k, v in per_step.items()}
    n_levels = len(levels)
    out = {
        "what": "seconds per local step, median over repetitions (interleaved)",
        "machine": machine(),
        "model": args.model,
        "random_init": args.random_init,
        "dtype": str(dtype),
        "device": str(device),
        "batch": [args.batch, args.seq],
        "rank": R,
        "levels": levels,
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "seconds_per_step": med,
        "all_reps": per_step,
        "ratio_sample_vs_peft": med["prelort_sample"] / med["peft"],
        "ratio_plain_vs_peft": med["prelort_plain"] / med["peft"],
        "target_sample_vs_peft": 1.05,
        "all_mode": {
            "levels_per_step": n_levels,
            "ratio_vs_peft": med["prelort_all"] / med["peft"],
            "ratio_per_level_vs_peft": med["prelort_all"] / med["peft"] / n_levels,
            "stacked_ratio_vs_peft": med["prelort_all_stacked"] / med["peft"],
            "stacked_speedup_vs_sequential": med["prelort_all"] / med["prelort_all_stacked"],
            "stacked_grad_max_rel_diff": max_rel,
        },
        "answer_loss": {
            "what": "PEFT step, prelort's answer-only LM head loss vs transformers' full-logits loss",
            "answer_positions": int((batch["labels"][:, 1:] != -100).any(0).sum()),
            "positions": int(batch["labels"].shape[1] - 1),
            "ratio_vs_full_logits": med["peft_answer_loss"] / med["peft"],
        },
        "optimizer_step_seconds": {"masked_adamw": opt_masked, "torch_adamw": opt_torch},
    }
    write_json(args.out, out)
    print(
        f"sample/peft = {out['ratio_sample_vs_peft']:.3f}, plain/peft = {out['ratio_plain_vs_peft']:.3f}, "
        f"all/peft = {out['all_mode']['ratio_vs_peft']:.2f} ({n_levels} levels), "
        f"stacked all/peft = {out['all_mode']['stacked_ratio_vs_peft']:.2f}"
    )


if __name__ == "__main__":
    main()
