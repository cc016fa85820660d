"""Evaluation throughput and the work per-rank evaluation reuses (issue #6, item 6).

    python bench/eval_throughput.py     # SmolLM2-135M; writes bench/results/eval_throughput.json

On the test splits of the two SmolLM2 benchmark configs:

- likelihood scoring (BBC News, 5 topics): ``LMEvaluator`` (prompts in left-padded batches,
  each prompt's KV cache shared by its choices, only the last position's logits, perplexity
  taken from the correct choice's score) vs a naive scorer (one full forward of prompt +
  choice per choice, then a separate perplexity pass); and the scoring alone with
  ``eval_batch_size`` prompts per pass vs one prompt at a time. All must pick the same answers.
- ROUGE-L generation (Natural Instructions): the shipped ``LMEvaluator`` with batched
  left-padded greedy decoding (``eval_batch_size``, prompts sorted by length) vs one prompt at a
  time; the generation share is the evaluator's time minus its time with ``generate`` off.
- reuse across ranks: the evaluator tokenises once and is called per rank level; the cost of
  re-tokenising per level is measured, and round 0 (B = 0, the base model) is evaluated
  once per workload instead of once per level and method.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from prelort.config import load_config
from prelort.data.formatting import collate
from prelort.evaluation.lm import LMEvaluator, answer_nll, greedy_generate
from prelort.workloads import build_workload


@torch.no_grad()
def naive_choice_scores(model: Any, ev: LMEvaluator) -> tuple[list[int], float]:
    """Predictions by one full forward per (prompt, choice), and a separate perplexity pass."""
    preds = []
    for i in ev.with_choices:
        prompt = list(ev.prompt_ids[i])
        scores = []
        for c in ev.choice_ids[i]:
            ids = torch.tensor([prompt + list(c)])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            scores.append(float(sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(c))))
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    nll, n = 0.0, 0
    for s in range(0, len(ev.features), ev.batch_size):
        a, b = answer_nll(model, collate(ev.features[s : s + ev.batch_size], ev.pad_id))
        nll, n = nll + a, n + b
    return preds, nll / n


@torch.no_grad()
def our_predictions(model: Any, ev: LMEvaluator, batch_size: int) -> list[int]:
    """Predictions of ``batch_choice_logprobs``, ``batch_size`` prompts per pass (1 = one at a time)."""
    from prelort.evaluation.lm import batch_choice_logprobs

    out = []
    for start in range(0, len(ev.with_choices), batch_size):
        idx = ev.with_choices[start : start + batch_size]
        scores = batch_choice_logprobs(
            model, [ev.prompt_ids[i] for i in idx], [ev.choice_ids[i] for i in idx], ev.pad_id
        )
        out += [max(range(len(s)), key=s.__getitem__) for s in scores]
    return out


def evaluator_at(ev: LMEvaluator, batch_size: int, generate: bool) -> LMEvaluator:
    """``ev`` (its tokenisation shared) run with ``batch_size`` prompts per pass, generating or not."""
    out = copy.copy(ev)
    out.batch_size, out.generate = batch_size, generate
    return out


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bbc-config", default=str(ROOT / "configs" / "bench-bbc.toml"))
    p.add_argument("--ni-config", default=str(ROOT / "configs" / "bench-ni.toml"))
    p.add_argument("--levels", type=int, default=3, help="rank levels evaluated per round")
    p.add_argument("--out", default="bench/results/eval_throughput.json")
    args = p.parse_args()
    torch.manual_seed(0)

    # -- likelihood scoring -------------------------------------------------------------------
    bbc: Any = build_workload(load_config(args.bbc_config))
    model = bbc.build_model()
    ev = bbc.evaluator
    n_bbc = len(ev.examples)
    model(input_ids=torch.tensor([ev.prompt_ids[0]]))  # warm-up
    t_ours, metrics = timed(lambda: ev(model))
    t_naive, (naive_preds, naive_loss) = timed(lambda: naive_choice_scores(model, ev))
    t_one, one_preds = timed(lambda: our_predictions(model, ev, 1))
    t_batched, batched_preds = timed(lambda: our_predictions(model, ev, ev.batch_size))
    same_preds = batched_preds == naive_preds == one_preds
    t_tok, _ = timed(
        lambda: LMEvaluator(
            bbc.tokenizer, ev.examples, max_length=bbc.cfg.max_length, batch_size=ev.batch_size
        )
    )

    # -- generation ------------------------------------------------------------------------------
    ni: Any = build_workload(load_config(args.ni_config))
    gev = ni.evaluator
    n_ni = len(gev.examples)
    greedy_generate(model, [gev.prompt_ids[0]], max_new_tokens=2, pad_id=gev.pad_id, eos_id=gev.eos_id)
    t_nll, _ = timed(lambda: evaluator_at(gev, gev.batch_size, generate=False)(model))
    t_full, gen_metrics = timed(lambda: evaluator_at(gev, gev.batch_size, generate=True)(model))
    t_nll1, _ = timed(lambda: evaluator_at(gev, 1, generate=False)(model))
    t_full1, gen_metrics1 = timed(lambda: evaluator_at(gev, 1, generate=True)(model))
    t_gen, t_gen1 = t_full - t_nll, t_full1 - t_nll1

    L = args.levels
    out: dict[str, Any] = {
        "what": "evaluation throughput (examples/s) on SmolLM2-135M, base model, CPU unless stated",
        "machine": machine(),
        "likelihood": {
            "examples": n_bbc,
            "choices_per_example": len(ev.choice_ids[ev.with_choices[0]]),
            "ours_seconds": t_ours,
            "ours_examples_per_s": n_bbc / t_ours,
            "batch_size": ev.batch_size,
            "scoring_only_batched_seconds": t_batched,
            "scoring_only_one_prompt_at_a_time_seconds": t_one,
            "speedup_batched_vs_one_prompt_at_a_time": t_one / t_batched,
            "naive_seconds": t_naive,
            "naive_examples_per_s": n_bbc / t_naive,
            "speedup": t_naive / t_ours,
            "same_predictions": same_preds,
            "loss_ours": metrics["loss"],
            "loss_naive": naive_loss,
        },
        "generation": {
            "examples": n_ni,
            "max_new_tokens": gev.max_new_tokens,
            "batch_size": gev.batch_size,
            "batched_seconds": t_gen,
            "batched_examples_per_s": n_ni / t_gen,
            "one_at_a_time_seconds": t_gen1,
            "one_at_a_time_examples_per_s": n_ni / t_gen1,
            "speedup": t_gen1 / t_gen,
            "rouge_l_batched": gen_metrics["rouge_l"],
            "rouge_l_one_at_a_time": gen_metrics1["rouge_l"],
            "full_evaluator_seconds": t_full,
            "loss_only_evaluator_seconds": t_nll,
            "one_at_a_time_full_evaluator_seconds": t_full1,
            "one_at_a_time_loss_only_evaluator_seconds": t_nll1,
            "timing": "LMEvaluator with generate on minus off, at each batch size",
        },
        "reuse_across_ranks": {
            "levels": L,
            "tokenise_seconds": t_tok,
            "evaluate_seconds": t_ours,
            "speedup_tokenise_once": L * (t_tok + t_ours) / (t_tok + L * t_ours),
            "round0_evaluations": f"1 instead of {L} per workload (B = 0: every level is the base model)",
        },
    }
    write_json(args.out, out)
    lk, g = out["likelihood"], out["generation"]
    print(
        f"likelihood: {lk['ours_examples_per_s']:.2f} ex/s vs naive {lk['naive_examples_per_s']:.2f} "
        f"(x{lk['speedup']:.1f}, same predictions: {same_preds}); generation: "
        f"{g['batched_examples_per_s']:.2f} ex/s batched vs "
        f"{g['one_at_a_time_examples_per_s']:.2f} one at a time "
        f"(x{g['speedup']:.1f})"
    )


if __name__ == "__main__":
    main()
