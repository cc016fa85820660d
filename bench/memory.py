"""Peak memory of a simulated run vs the number of clients (issue #6, item 4).

    python bench/memory.py          # K = 10, 100, 1000; writes bench/results/memory.json

Each K runs in a fresh process: SmolLM2-135M on BBC News (the bench-bbc config) with the
same 2000 articles split IID over K clients, 2 of them sampled per round, 2 rounds of one
local step of batch 1 (so activations are the same at every K), R = 8, evaluation on 4 test
articles. The data are the same for every K, so the growth of peak RSS with K is the
simulator's per-client cost. Reported beside it: the base
model's parameter bytes, the optimiser state (MaskedAdamW: 2 x the rank-R adapter) and one
rank-R adapter, i.e. the floor "base model + optimiser + O(clients x adapter)".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json


def child(num_clients: int, config: str) -> dict[str, Any]:
    """Run the simulation in this process; report its peak RSS and the model's sizes."""
    from prelort.config import load_config
    from prelort.federation.simulator import run_simulation
    from prelort.workloads import build_workload

    cfg = load_config(
        config,
        [
            f"clients.num_clients={num_clients}",
            "clients.levels=[2,4,8]",
            "run.clients_per_round=2",
            "run.rounds=2",
            "run.eval_every=2",
            "run.eval_levels=[8]",
            "train.steps=1",
            "train.batch_size=1",  # every client holds >= 2 examples at K = 1000: same batch at every K
            "llm.partition=iid",
            "llm.max_examples=2004",
            "llm.test_examples=4",
        ],
    )
    workload: Any = build_workload(cfg)
    model = workload._model  # the loaded base model, before the simulator takes it
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shapes: list[tuple[int, int]] = []
    for name, mod in model.named_modules():
        if any(name.endswith(t) for t in workload.target_modules) and hasattr(mod, "in_features"):
            shapes.append((mod.out_features, mod.in_features))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = run_simulation(cfg, workload)
    R = cfg.max_rank
    adapter_bytes = sum(R * (o + i) * 4 for o, i in shapes)
    return {
        "clients": num_clients,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_after_model_and_data_bytes": rss_loaded,
        "base_model_param_bytes": param_bytes,
        "adapter_bytes_rank_R": adapter_bytes,
        "optimizer_state_bytes": 2 * adapter_bytes,
        "train_examples": sum(workload.num_examples(k) for k in range(num_clients)),
        "rounds_done": len(res["rounds"]) - 1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-bbc.toml"))
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/memory.json")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config)))
        return
    rows = []
    for k in [int(x) for x in args.clients.split(",")]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(k), "--config", args.config],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"K={k} failed: {proc.stderr.strip().splitlines()[-1]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"K={k:5d}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    first, last = rows[0], rows[-1]
    per_client = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / max(
        last["clients"] - first["clients"], 1
    )
    floor = first["base_model_param_bytes"] + first["optimizer_state_bytes"] + first["adapter_bytes_rank_R"]
    out = {
        "what": "peak RSS of a simulated SmolLM2 run (2 clients sampled per round) vs number of clients",
        "machine": machine(),
        "rows": rows,
        "bytes_per_client": per_client,
        "adapter_bytes_rank_R": first["adapter_bytes_rank_R"],
        "floor_model_optimizer_adapter_bytes": floor,
        "note": "peak RSS also holds the Python/torch/transformers runtime, the tokenised data and "
        "the activations of one training step; only its growth with K is per-client cost",
    }
    write_json(args.out, out)
    print(f"per client: {per_client:.0f} bytes (one rank-R adapter is {first['adapter_bytes_rank_R']} bytes)")


if __name__ == "__main__":
    main()
