"""Bytes up and down per client per round for every method (issue #6, item 5).

    python bench/communication.py      # writes bench/results/communication.json

Runs the real rules (``make_rule``, ``initial_state``, ``downlink``, ``server_update``) on
SmolLM2-135M's real LoRA module shapes (q_proj, v_proj of every layer, read from the model
built on the meta device: no weights needed) with one client per rank level. Uplink: the
client's rank-r adapter as ``client_update`` returns it; downlink: what the rule sends a
rank-r client (plus FLoRA's broadcast of the stacked factors from round 2 on). For
``prelort`` the script asserts that up and down are exactly the rank-r prefix,
sum_m r (in_m + out_m) x 4 bytes. If the committed SmolLM2 runs are present, their recorded
per-round bytes are checked against these per-client figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json
from prelort.adapters import LoRAPair
from prelort.adapters.state import adapter_num_bytes
from prelort.aggregation import ClientUpdate
from prelort.config import load_config
from prelort.federation.core import initial_state, server_update
from prelort.federation.plan import build_plan

METHODS = ["prelort", "segment", "hetlora", "flexlora", "flora", "fedit", "fedit-max"]


def module_shapes(model: str, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every target linear module of ``model``, built without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prelort.models import ensure_cached

    config = AutoConfig.from_pretrained(ensure_cached(model))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return {
        name: (m.out_features, m.in_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    }


def per_client_bytes(cfg_path: str, method: str, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    plan = build_plan(load_config(cfg_path, [f"run.method={method}"]))
    rule = plan.make_rule()
    state = initial_state(plan, shapes, rule)
    g = torch.Generator().manual_seed(0)
    rows: dict[str, Any] = {}
    updates = []
    ranks = sorted(set(state.client_ranks))
    for r in ranks:
        down = rule.message(state.adapter, state.rule_state, r).num_bytes
        upd = {
            n: LoRAPair(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g))
            for n, (o, i) in shapes.items()
        }
        updates.append(ClientUpdate(upd, r, 10, state.client_ranks.index(r)))
        rows[str(r)] = {"up": adapter_num_bytes(upd), "down_round1": down}
    state2, _ = server_update(state, rule, updates)
    for r in ranks:
        rows[str(r)]["down_later_rounds"] = rule.message(state2.adapter, state2.rule_state, r).num_bytes
    return {"client_ranks": ranks, "per_rank": rows, "broadcast_bytes": rule.extra_bytes(state2.rule_state)}


def check_runs(runs_dir: Path, table: dict[str, Any]) -> dict[str, Any]:
    """Recorded round bytes of committed runs vs the per-client figures (sum over sampled clients)."""
    checks: dict[str, Any] = {}
    for res_file in sorted(runs_dir.glob("*/results.json")):
        res = json.loads(res_file.read_text())
        method = res["method"]
        if method not in table or method == "hetlora":  # hetlora ranks shrink by self-pruning
            continue
        rows = table[method]["per_rank"]
        ok = True
        previous: list[int] = []
        for rec in res["rounds"][1:]:
            ranks = [res["effective_ranks"][k] for k in rec["clients"]]
            ok &= rec["bytes_up"] == sum(rows[str(r)]["up"] for r in ranks)
            # every rule's rank-r downlink is the same size each round; FLoRA adds the broadcast
            # of the previous round's stacked client factors (the sum of their uplinks)
            broadcast = sum(rows[str(r)]["up"] for r in previous) if method == "flora" else 0
            ok &= rec["bytes_down"] == sum(rows[str(r)]["down_round1"] + broadcast for r in ranks)
            previous = [res["effective_ranks"][k] for k in rec["aggregated"]]
        checks[res_file.parent.name] = ok
    return checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-bbc.toml"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default=str(ROOT / "bench" / "results" / "smollm2-bbc" / "runs"))
    p.add_argument("--out", default="bench/results/communication.json")
    args = p.parse_args()
    shapes = module_shapes(args.model, ["q_proj", "v_proj"])
    table = {m: per_client_bytes(args.config, m, shapes) for m in METHODS}
    for r, row in table["prelort"]["per_rank"].items():
        prefix = sum(int(r) * (o + i) * 4 for o, i in shapes.values())
        assert row["up"] == row["down_round1"] == row["down_later_rounds"] == prefix, (r, row, prefix)
    out = {
        "what": "bytes per client per round (fp32 factors), SmolLM2-135M q_proj+v_proj",
        "machine": machine(),
        "modules": len(shapes),
        "prelort_sends_exactly_the_prefix": True,
        "methods": table,
        "recorded_runs_match": check_runs(Path(args.runs), table) if Path(args.runs).is_dir() else {},
    }
    write_json(args.out, out)
    for m, t in table.items():
        cells = ", ".join(
            f"r{r}: up {v['up'] / 1e6:.2f} MB / down {v['down_round1'] / 1e6:.2f}"
            f"->{v['down_later_rounds'] / 1e6:.2f} MB"
            for r, v in t["per_rank"].items()
        )
        print(f"{m:9s} {cells}")
    print("recorded runs match:", out["recorded_runs_match"])


if __name__ == "__main__":
    main()
