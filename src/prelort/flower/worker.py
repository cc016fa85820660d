"""A node's warm worker: one long-lived process that computes its ClientApp's messages.

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every message, so a
ClientApp that computed in place would import torch and PEFT (with transformers) and build
the workload and base model again for every message (~4-5 s and ~6 CPU-s on a small
machine). Started next to a SuperNode, this process keeps them: the ClientApp, told its
address by the node config (``worker='unix:/path.sock'``), sends it each message's content
and returns its answer, importing nothing but Flower itself.

    python -m prelort.flower.worker --address unix:/run/prelort/node-0.sock [--parent-pid PID]
    python -m prelort.flower.worker --port 7700            # 127.0.0.1:7700 (prefer a Unix socket)

**Protocol** (``prelort.flower.worker_protocol``, whose names this module re-exports): one
request per connection, served one at a time; the client sends a JSON header
``{"protocol": 1, "op": "train" | "evaluate", "node-config": {...}}`` and the message
content (a ``RecordDict`` in Flower's own protobuf serde), each frame prefixed with its
8-byte length. The worker answers with the header ``{"ok": true}`` and the reply's
``RecordDict``, or ``{"ok": false, "error": "<Type>: <message>"}`` and an empty body when the
work (or the request) failed; the worker logs the traceback and goes on serving. The work is
``prelort.flower.client_app.handle``, the same function the ClientApp runs in-process
without a worker; the ClientApp imports only the protocol module (its ``call``), never this
one, so the two do not import each other.

**Lifetime**: the worker binds its address at once (a Unix socket is created mode 0600,
refusing to replace a live one), then imports torch, PEFT and PreLort's client code
(``--no-preload``: on the first request); the workload and model are built on the first
request of a config. It exits on SIGTERM / SIGINT and when its parent process (default: the
process that started it; ``--parent-pid``: another one, 0: none) dies, and removes its
socket file either way. At start this module imports only Flower, psutil and the standard
library; torch, PEFT and the client code come with ``preload`` or the first request.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from prelort.flower.worker_protocol import (
    MAX_HEADER_BYTES,
    OPS,
    PROTOCOL,
    Address,
    WorkerError,
    call,
    decode_content,
    encode_content,
    parse_address,
    recv_frames,
    send_frames,
)
from prelort.processes import pid_alive

__all__ = [
    "MAX_HEADER_BYTES",
    "OPS",
    "PROTOCOL",
    "Address",
    "Worker",
    "WorkerError",
    "call",
    "decode_content",
    "encode_content",
    "handle_request",
    "main",
    "parse_address",
    "preload",
    "recv_frames",
    "send_frames",
    "watch_parent",
]
"""The worker's own names and, re-exported, the protocol's (``prelort.flower.worker_protocol``)."""

log = logging.getLogger("prelort.worker")


# -- the worker's side ------------------------------------------------------------------------------
def handle_request(header: Mapping[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    """One request's (reply header, reply body); any exception becomes an error header."""
    try:
        if header.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol {header.get('protocol')!r}, this worker speaks {PROTOCOL}")
        op = header.get("op")
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
        node_config = header.get("node-config", {})
        if not isinstance(node_config, dict):
            raise ValueError("node-config is not a JSON object")
        from prelort.flower.client_app import handle

        started = time.perf_counter()
        reply = handle(op, decode_content(body), node_config)
        log.info(
            "%s for partition %s in %.3f s",
            op,
            node_config.get("partition-id"),
            time.perf_counter() - started,
        )
        return {"ok": True}, encode_content(reply)
    except Exception as exc:
        log.exception("request failed")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b""


def preload() -> None:
    """Import what the work needs (torch, PEFT, PreLort's client code) before the first request."""
    import prelort.federation.core
    import prelort.federation.plan
    import prelort.federation.simulator
    import prelort.flower.client_app
    import prelort.flower.records
    import prelort.workloads  # noqa: F401


class Worker:
    """A listening worker; ``serve_forever`` answers requests one at a time until ``close``."""

    def __init__(self, address: str, *, accept_timeout: float = 0.5, read_timeout: float = 600.0) -> None:
        self.address = address
        self.read_timeout = read_timeout
        family, target = parse_address(address)
        self.path = target if isinstance(target, str) else None
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        if self.path is not None:
            _clear_stale_socket(self.path)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.path is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            old_umask = os.umask(0o177) if self.path is not None else None
            try:
                sock.bind(target)
            finally:
                if old_umask is not None:
                    os.umask(old_umask)
            sock.listen(16)
            sock.settimeout(accept_timeout)  # so that ``close`` from another thread is seen
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def serve_forever(self) -> None:
        """Accept and answer requests until ``close`` (or the listening socket fails)."""
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.read_timeout)
        try:
            header, body = recv_frames(conn)
        except (OSError, ValueError) as exc:
            log.warning("dropped a malformed or broken request: %s", exc)
            return
        reply_header, reply_body = handle_request(header, body)
        try:
            send_frames(conn, reply_header, reply_body)
        except OSError as exc:
            log.warning("could not send the reply (the ClientApp is gone?): %s", exc)

    def close(self) -> None:
        """Stop serving, close the listening socket and remove its file (idempotent).

        The whole clean-up runs under the lock, so a second caller (the main thread, woken by
        the closed socket while the parent watchdog is closing) returns only once the socket
        file is gone; otherwise the process could exit between ``close`` and ``unlink``."""
        with self._lock:
            if self._closed:
                return
            self._stop.set()
            with contextlib.suppress(OSError):
                self.sock.close()
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self._closed = True

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to replace a live socket or another file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise FileExistsError(f"another worker already listens on {path}")


def watch_parent(pid: int, worker: Worker, interval: float = 0.5) -> threading.Thread:
    """A daemon thread that removes the socket and ends this process once ``pid`` is gone
    (dead, a zombie, or no longer our parent where it was: we were re-parented)."""
    was_parent = os.getppid() == pid

    def run() -> None:
        while pid_alive(pid) and not (was_parent and os.getppid() != pid):
            time.sleep(interval)
        log.warning("parent process %d is gone; exiting", pid)
        worker.close()
        logging.shutdown()
        os._exit(0)

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m prelort.flower.worker",
        description="A SuperNode's warm PreLort worker: keeps the workload and model loaded and "
        "computes the node's train/evaluate messages for its ClientApp (node config worker='ADDRESS').",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="unix:/path/to.sock (recommended) or host:port")
    where.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT")
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process dies (default: the process that started the worker; 0: never)",
    )
    p.add_argument(
        "--no-preload", action="store_true", help="import torch/PEFT on the first request, not at start"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prelort-worker %(levelname)s %(message)s")
    address = args.address if args.address is not None else f"127.0.0.1:{args.port}"
    parent = os.getppid() if args.parent_pid is None else args.parent_pid
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        worker = Worker(address)
    except (OSError, ValueError) as exc:
        print(f"prelort.flower.worker: error: {exc}", file=sys.stderr)
        return 2
    try:
        if parent > 0:
            watch_parent(parent, worker)
        log.info("listening on %s (pid %d, parent %d)", address, os.getpid(), parent)
        if not args.no_preload:
            started = time.perf_counter()
            preload()
            log.info("preloaded torch, PEFT and the client code in %.1f s", time.perf_counter() - started)
        worker.serve_forever()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
