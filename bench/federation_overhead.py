"""Federation overhead: one simulated round vs the same local steps in a bare PEFT loop (#6, item 2).

    python bench/federation_overhead.py      # writes bench/results/federation_overhead.json

Both sides train SmolLM2-135M on the same client batches (BBC News, the bench-bbc config):

- ``round``: ``RoundDriver.run_round`` (in-process transport) for K sampled clients x s local steps
  with the given method: downlink, ``client_update`` (load prefix, ``train_local``, read the
  prefix back), validation, ``server_update`` (aggregation), byte accounting;
- ``bare``: the same K x s steps as a plain PEFT LoRA loop at rank R (``get_peft_model`` +
  ``torch.optim.AdamW``, a fresh optimiser per client as a fresh client would have), on the
  batches the round's clients drew (same generator seeds), no federation at all.

Repetitions alternate round t and its bare twin; the median ratio is reported. The time of
``server_update`` alone is measured too, as a fraction of the round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from prelort.config import load_config
from prelort.federation.core import client_update, server_update
from prelort.federation.plan import generator_for
from prelort.federation.simulator import make_driver
from prelort.workloads import build_workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-bbc.toml"))
    p.add_argument("--method", default="prelort")
    p.add_argument("--clients", type=int, default=3, help="K, clients per round")
    p.add_argument("--steps", type=int, default=4, help="s, local steps per client")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    p.add_argument("--out", default="bench/results/federation_overhead.json")
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model

    overrides = [
        f"run.method={args.method}",
        f"run.clients_per_round={args.clients}",
        f"train.steps={args.steps}",
        f"run.rounds={args.reps}",
        *args.set,
    ]
    cfg = load_config(args.config, overrides)
    workload: Any = build_workload(cfg)
    captured: list[Any] = []

    def capturing_client(*a: Any, **kw: Any) -> Any:
        res = client_update(*a, **kw)
        captured.append(res.update)
        return res

    driver = make_driver(cfg, workload, client_fn=capturing_client)
    plan, rule = driver.plan, driver.rule
    state, _ = driver.start()
    R = plan.max_rank

    peft_model = get_peft_model(
        workload.build_model(),
        LoraConfig(
            r=R,
            lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
            target_modules=list(cfg.lora.target_modules or workload.target_modules),
            lora_dropout=0.0,
            bias="none",
        ),
    )
    lora_params = [q for q in peft_model.parameters() if q.requires_grad]

    def bare_loop(t: int) -> float:
        t0 = time.perf_counter()
        peft_model.train()
        for k in plan.sample(t):
            opt = torch.optim.AdamW(lora_params, lr=cfg.train.lr)
            batches = workload.batches(k, generator_for(cfg.run.seed, "client", t, k))
            for _ in range(cfg.train.steps):
                workload.loss(peft_model, next(batches)).backward()
                opt.step()
                opt.zero_grad()
        peft_model.eval()
        return time.perf_counter() - t0

    rounds, bares, aggs = [], [], []
    for t in range(1, args.reps + 1):
        before = state
        captured.clear()
        t0 = time.perf_counter()
        state, _record = driver.run_round(t, state)
        rounds.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        server_update(before, rule, captured)  # aggregation alone, same inputs
        aggs.append(time.perf_counter() - t1)
        bares.append(bare_loop(t))
        print(
            f"round {t}: {rounds[-1]:.2f}s, bare {bares[-1]:.2f}s, aggregation {aggs[-1] * 1e3:.1f} ms",
            flush=True,
        )

    ratios = [r / b for r, b in zip(rounds, bares, strict=True)]
    out: dict[str, Any] = {
        "what": "one simulated round of K clients x s steps vs the same steps in a bare PEFT loop",
        "machine": machine(),
        "config": str(Path(args.config).relative_to(ROOT))
        if Path(args.config).is_relative_to(ROOT)
        else args.config,
        "method": cfg.run.method,
        "clients_per_round": cfg.run.clients_per_round,
        "local_steps": cfg.train.steps,
        "batch": [cfg.train.batch_size, cfg.llm.max_length],
        "max_rank": R,
        "round_seconds": rounds,
        "bare_seconds": bares,
        "aggregation_seconds": aggs,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "aggregation_fraction_of_round": statistics.median(aggs) / statistics.median(rounds),
        "target_ratio": 1.10,
    }
    write_json(args.out, out)
    print(
        f"round / bare = {out['ratio_median']:.3f} (target <= 1.10); "
        f"aggregation = {100 * out['aggregation_fraction_of_round']:.3f}% of a round"
    )


if __name__ == "__main__":
    main()
