"""A no-op Flower app: the floor of a Flower round on this machine (bench/flower_overhead.py).

``server``: waits for ``nodes`` nodes, then ``rounds`` times sends every node one TRAIN
message holding ``sizes[i]`` float32 values and pulls the replies every ``poll-interval``
seconds, as PreLort's ServerApp does; writes the seconds of every round to ``out``.
``client``: replies at once with the arrays it received. Only Flower and numpy are imported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Echo the received arrays."""
    return Message(RecordDict({"adapter": msg.content.array_records["adapter"]}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Rounds of one echo message per node; per-round seconds to ``out``."""
    conf = context.run_config
    rounds, nodes, poll = int(conf["rounds"]), int(conf["nodes"]), float(conf["poll-interval"])
    sizes = [int(s) for s in str(conf["sizes"]).split(",")]
    deadline = time.monotonic() + 120
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {nodes} nodes connected")
        time.sleep(0.2)
    payload = {
        n: ArrayRecord({"x": Array(np.zeros(sizes[i % len(sizes)], dtype=np.float32))})
        for i, n in enumerate(node_ids)
    }
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        msgs = [
            Message(RecordDict({"adapter": payload[n]}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in node_ids
        ]
        pending = {mid for mid in grid.push_messages(msgs) if mid}
        while pending:
            got = list(grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(poll)
        seconds.append(time.perf_counter() - t0)
    Path(str(conf["out"])).write_text(json.dumps({"round_seconds": seconds}) + "\n", encoding="utf-8")
