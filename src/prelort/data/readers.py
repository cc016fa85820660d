"""Readers of instruction files: UTF-8 text, JSON arrays, JSONL and CSV into located records.

Each reader returns ``(where, record)`` pairs, ``where`` being ``"file:line"`` or
``"file[item]"``, so that a bad record can be reported by place. Every bad input (missing
or empty file, bad JSON, non-UTF-8 bytes, malformed CSV) raises :class:`DataError` with one line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prelort.data.examples import DataError

__all__ = ["READERS", "Located", "Record", "read_csv", "read_json", "read_jsonl", "read_text"]

Record = dict[str, Any]
Located = tuple[str, Record]  # (where: "file:line" or "file[item]", record)


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a BOM is allowed); DataError if missing, empty or not UTF-8."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs at least one record")
    return text


def read_jsonl(path: Path) -> list[Located]:
    """One JSON object a line; blank lines are skipped."""
    records: list[Located] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    return records


def read_json(path: Path) -> list[Located]:
    """A JSON array of objects."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of objects, got {type(data).__name__}; "
            "use .jsonl for one object a line"
        )
    records: list[Located] = []
    for item, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{item}]: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path}[{item}]", record))
    if not records:
        raise DataError(f"{path}: the JSON array is empty; it needs at least one record")
    return records


def read_csv(path: Path) -> list[Located]:
    """A CSV file with a header row; ``where`` is the line on which each row ends."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    records: list[Located] = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: the row has more values than the header has columns")
            records.append((where, {key: value for key, value in row.items() if value is not None}))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not records:
        raise DataError(f"{path}: the CSV file has a header but no rows")
    return records


READERS: dict[str, Callable[[Path], list[Located]]] = {
    ".json": read_json,
    ".jsonl": read_jsonl,
    ".csv": read_csv,
}
