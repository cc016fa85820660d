"""Aggregation cost of every rule vs number of clients and rank, on SmolLM2-135M's real shapes.

SmolLM2-135M (LLaMA): 30 layers, hidden 576, 9 heads x 64 (q_proj 576->576), 3 KV heads x 64
(v_proj 576->192); LoRA on q_proj and v_proj = 60 modules. Client ranks are spread over the
levels {R/8, R/4, R/2, R}. Median of several repetitions, single process.

    python bench/aggregation_cost.py --out bench/results/aggregation_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prelort.adapters import LoRAPair, Scaling
from prelort.aggregation import ClientUpdate, aggregate

SHAPES = {f"layers.{i}.q_proj": (576, 576) for i in range(30)} | {
    f"layers.{i}.v_proj": (192, 576) for i in range(30)
}


def make_round(
    num_clients: int, R: int, seed: int = 0, shapes: dict[str, tuple[int, int]] = SHAPES
) -> tuple[dict[str, LoRAPair], list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    levels = [max(R // 8, 1), max(R // 4, 1), max(R // 2, 1), R]
    glob = {
        n: LoRAPair(torch.randn(R, i, generator=g), torch.randn(o, R, generator=g))
        for n, (o, i) in shapes.items()
    }
    ups = []
    for k in range(num_clients):
        r = levels[k % len(levels)]
        ad = {
            n: LoRAPair(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g))
            for n, (o, i) in shapes.items()
        }
        ups.append(ClientUpdate(ad, r, 10 + k % 7, k))
    return glob, ups


def time_rule(rule: str, glob: dict[str, LoRAPair], ups: list[ClientUpdate], R: int, reps: int) -> float:
    scaling = Scaling("fixed", 2.0 * R, R)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        aggregate(rule, glob, ups, scaling=scaling, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/aggregation_cost.json")
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    rules = ["segment", "hetlora", "flexlora", "flora", "fedit"]
    rows = []
    for R in [int(x) for x in args.ranks.split(",")]:
        for K in [int(x) for x in args.clients.split(",")]:
            glob, ups = make_round(K, R)
            for rule in rules:
                use = (
                    ups
                    if rule != "fedit"
                    else [
                        ClientUpdate(u.adapter, u.rank, u.num_examples, u.client_id)
                        for u in ups
                        if u.rank == R
                    ]
                )
                if not use:
                    continue
                reps = 1 if K >= 1000 else args.reps
                sec = time_rule(rule, glob, use, R, reps)
                rows.append({"rule": rule, "clients": len(use), "R": R, "seconds": sec})
                print(f"R={R:3d} K={len(use):5d} {rule:9s} {sec * 1e3:9.1f} ms", flush=True)
    # module size: one module of each shape (SmolLM2's v_proj, q_proj, MLP up_proj), K = 100, R = 16
    size_rows = []
    for o, i in [(192, 576), (576, 576), (1536, 576)]:
        glob, ups = make_round(100, 16, shapes={"m": (o, i)})
        for rule in rules[:-1]:
            sec = time_rule(rule, glob, ups, 16, args.reps)
            size_rows.append({"rule": rule, "shape": [o, i], "clients": 100, "R": 16, "seconds": sec})
            print(f"shape {o}x{i} {rule:9s} {sec * 1e3:9.2f} ms", flush=True)
    out = {
        "what": "median seconds per aggregation, the 60 q/v modules of SmolLM2-135M (or one given shape)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "modules": len(SHAPES),
        "rows": rows,
        "module_size_rows": size_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
