"""The wire protocol between a ClientApp and its node's warm worker, and the ClientApp's side.

**Protocol** (one request per connection, served one at a time): the client sends two
frames, each an 8-byte big-endian length and its bytes: a JSON header
``{"protocol": 1, "op": "train" | "evaluate", "node-config": {...}}`` and the message
content, a ``RecordDict`` serialized with Flower's own serde (``recorddict_to_proto``, the
protobuf Flower puts on the wire). The worker answers with the same two frames: the header
``{"ok": true}`` and the reply's ``RecordDict``, or ``{"ok": false, "error": "<Type>:
<message>"}`` and an empty body when the work (or the request) failed.

``call`` is the ClientApp's side (``prelort.flower.client_app``); the worker's side is
``prelort.flower.worker``, which re-exports these names. Both import this module and neither
imports the other at module level, so there is no import cycle between them. Imports only
Flower and the standard library: a ClientApp that only forwards stays light (no torch).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

PROTOCOL = 1
OPS = ("train", "evaluate")
_LENGTH = struct.Struct(">Q")
MAX_HEADER_BYTES = 1 << 20
"""A header longer than this is refused (a client speaking something else)."""

Address = tuple[socket.AddressFamily, str | tuple[str, int]]


class WorkerError(RuntimeError):
    """The worker could not be reached, broke the protocol, or its work raised."""


def parse_address(text: str) -> Address:
    """``unix:/path.sock`` -> (AF_UNIX, path); ``host:port`` -> (AF_INET, (host, port))."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"worker address {text!r}: empty socket path")
        return socket.AF_UNIX, path
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {text!r}: expected unix:/path/to.sock or host:port")
    return socket.AF_INET, (host, int(port))


# -- framing ---------------------------------------------------------------------------------------
def encode_content(content: RecordDict) -> bytes:
    """A message's ``RecordDict`` as Flower's protobuf bytes."""
    data: bytes = recorddict_to_proto(content).SerializeToString()
    return data


def decode_content(data: bytes) -> RecordDict:
    """Inverse of ``encode_content``."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def send_frames(sock: socket.socket, header: Mapping[str, Any], body: bytes) -> None:
    """Send a JSON header and a body, each prefixed with its 8-byte length."""
    head = json.dumps(dict(header)).encode()
    sock.sendall(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(body)))
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frames(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive what ``send_frames`` sent: (header, body)."""
    (n,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"header of {n} bytes (at most {MAX_HEADER_BYTES}): not a PreLort worker peer")
    header = json.loads(_recv_exact(sock, n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    (m,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    return header, _recv_exact(sock, m)


# -- the ClientApp's side ----------------------------------------------------------------------------
def call(
    address: str,
    op: str,
    content: RecordDict,
    node_config: Mapping[str, bool | int | float | str],
    *,
    connect_timeout: float = 10.0,
) -> RecordDict:
    """Hand one message's work to the worker at ``address``; the reply's content.

    Waits up to ``connect_timeout`` seconds for a worker that is still starting; raises
    ``WorkerError`` if none answers, the connection breaks, or the work raised there.
    """
    try:
        family, target = parse_address(address)
    except ValueError as exc:
        raise WorkerError(str(exc)) from None
    deadline = time.monotonic() + connect_timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(target)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise WorkerError(f"no worker at {address} ({exc.strerror})") from None
            time.sleep(0.05)
        except OSError as exc:
            sock.close()
            raise WorkerError(f"cannot reach the worker at {address}: {exc}") from None
    with sock:
        try:
            request = {"protocol": PROTOCOL, "op": op, "node-config": dict(node_config)}
            send_frames(sock, request, encode_content(content))
            header, body = recv_frames(sock)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"the worker at {address} failed to answer: {exc}") from None
    if header.get("ok") is not True:
        raise WorkerError(f"the worker at {address}: {header.get('error', 'no reason given')}")
    return decode_content(body)
