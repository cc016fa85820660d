"""What a person watches while a run goes: a progress display and TensorBoard event files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prelort.federation.core import ServerState
    from prelort.federation.plan import RunPlan


class RoundProgress:
    """What a person watches: a bar over rounds, and one over the current round's client steps
    (in-process) with the client and its rank, then the rank level being evaluated."""

    def __init__(self, plan: RunPlan, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.plan = plan
        cfg = plan.cfg
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.rounds = self.bar.add_task(f"{cfg.run.method} seed {cfg.run.seed}", total=cfg.run.rounds)
        self.inner = self.bar.add_task("", total=1, visible=False)
        self.bar.update(self.rounds, completed=done)
        self.t = 0
        self.clients: list[tuple[int, int]] = []
        self.bar.start()

    def round_started(self, t: int, clients: list[tuple[int, int]]) -> None:
        """Round ``t`` sends to ``clients`` = [(client id, rank)]."""
        self.t, self.clients = t, clients
        total = sum(self.plan.local_config(r, t).steps for _, r in clients)
        self.bar.update(
            self.inner, description=f"round {t}: training", total=total, completed=0, visible=True
        )

    def client_started(self, index: int, client_id: int, rank: int) -> None:
        self.bar.update(
            self.inner,
            description=f"round {self.t}: client {client_id} (rank {rank}), {index + 1}/{len(self.clients)}",
        )

    def step(self) -> None:
        self.bar.advance(self.inner)

    def evaluating(self, level: int) -> None:
        self.bar.update(self.inner, description=f"evaluating at rank {level}", visible=True)

    def round_done(self, record: dict[str, Any]) -> None:
        self.bar.update(self.inner, visible=False)
        self.bar.advance(self.rounds)
        self.bar.console.print(round_line(record))

    def stop(self) -> None:
        self.bar.stop()


class TensorBoardLog:
    """TensorBoard event files of a run (``run.tensorboard``): per round the train loss, bytes,
    passes and examples, and every evaluated metric per rank level as ``r{level}/{metric}``.
    A round observer of the driver (``on_round``)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional extra
            from prelort.errors import UserError

            raise UserError(
                f"run.tensorboard = true needs the tensorboard package ({exc}); "
                "pip install 'prelort[tensorboard]' or set run.tensorboard = false"
            ) from None
        self.writer = SummaryWriter(str(folder))

    def on_round(self, record: dict[str, Any]) -> None:
        t = int(record["round"])
        for key in ("train_loss", "bytes_up", "bytes_down", "passes", "examples", "seconds"):
            value = record.get(key)
            if isinstance(value, int | float) and value == value:  # skip NaN
                self.writer.add_scalar(f"round/{key}", value, t)
        for level, metrics in record.get("per_rank", {}).items():
            for name, value in metrics.items():
                self.writer.add_scalar(f"r{level}/{name}", value, t)
        self.writer.flush()

    def on_state(self, state: ServerState, rounds: list[dict[str, Any]]) -> None:
        """Nothing: the events follow the round records."""

    def close(self) -> None:
        self.writer.close()


class MLflowLog:
    """An MLflow run (``run.report_to = ["mlflow"]``): the resolved config as params, per round
    the metrics :class:`TensorBoardLog` writes under the same names (``round/passes``,
    ``r{level}/{metric}``), step = round. A round observer of the driver."""

    def __init__(self, uri: str, run_name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:  # mlflow is an optional extra
            from prelort.errors import UserError

            raise UserError(
                f"run.report_to = ['mlflow'] needs the mlflow package ({exc}); "
                "pip install 'prelort[mlflow]' or remove it from run.report_to"
            ) from None
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        del mlflow  # imported to check it is installed; the client does the work
        try:
            self.client = MlflowClient(uri)
            experiment = self.client.get_experiment_by_name("prelort")
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment("prelort")
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as err:  # a bad or unreachable tracking URI
            from prelort.errors import UserError

            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserError(
                f"MLflow tracking URI {uri!r} cannot be used: {type(err).__name__}: {reason}"
            ) from None
        items = [Param(key, str(value)[:6000]) for key, value in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def on_round(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        t, now = int(record["round"]), int(time.time() * 1000)
        metrics = []
        for key in ("train_loss", "bytes_up", "bytes_down", "passes", "examples", "seconds"):
            value = record.get(key)
            if isinstance(value, int | float) and value == value:  # skip NaN
                metrics.append(Metric(f"round/{key}", float(value), now, t))
        for level, values in record.get("per_rank", {}).items():
            for name, value in values.items():
                metrics.append(Metric(f"r{level}/{name}", float(value), now, t))
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_state(self, state: ServerState, rounds: list[dict[str, Any]]) -> None:
        """Nothing: the metrics follow the round records."""

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def round_line(record: dict[str, Any]) -> str:
    """A one-line summary of a round record for the console."""
    line = f"round {record['round']}: {record['seconds']:.1f}s, train loss {record['train_loss']:.4g}"
    if record.get("dropped"):
        line += f", {len(record['dropped'])} dropped"
    if "per_rank" in record:
        parts = []
        for lv, metrics in record["per_rank"].items():
            key = next((k for k in ("accuracy", "rouge_l", "rel_loss") if k in metrics), "loss")
            parts.append(f"r{lv} {key}={metrics[key]:.4g}")
        line += "; " + ", ".join(parts)
    return line
