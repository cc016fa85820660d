"""Turning located records into :class:`Example` objects: field access, prompt joining, and
the field mapping of instruction records (the ``local`` and ``hub`` sources)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prelort.data.examples import DataError, Example
from prelort.data.readers import Located, Record

__all__ = [
    "CHAT_FIELDS",
    "CHAT_ROLES",
    "DOLLY_FIELDS",
    "FIELD_ROLES",
    "REQUIRED_ROLES",
    "chat_examples",
    "field_text",
    "instruction_examples",
    "join_prompt",
    "limit_records",
    "record_examples",
    "resolve_fields",
]

DOLLY_FIELDS: dict[str, str | None] = {
    "instruction": "instruction",
    "input": "context",
    "output": "response",
    "category": "category",
}
"""Default field mapping of the ``local`` and ``hub`` sources (databricks-dolly-15k)."""

CHAT_FIELDS: dict[str, str | None] = {"messages": "messages", "category": "category"}
"""Field mapping of chat data: a ``messages`` column of ``{role, content}`` turns."""

FIELD_ROLES = ("instruction", "input", "output", "category", "messages")
REQUIRED_ROLES = ("instruction", "output")
CHAT_ROLES = ("system", "user", "assistant")


def field_text(record: Record, field: str, where: str, *, required: bool = True, empty: bool = False) -> str:
    """Field ``field`` of ``record`` as text.

    DataError when ``required`` and missing, or when ``required`` and empty unless
    ``empty`` allows it.
    """
    value = record.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {field!r}; every record needs it")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
    text = str(value)
    if required and not empty and not text.strip():
        raise DataError(f"{where}: field {field!r} is empty; every record needs a value")
    return text


def join_prompt(*parts: str) -> str:
    """Join the non-empty parts of a prompt with a blank line."""
    return "\n\n".join(part.strip() for part in parts if part.strip())


def resolve_fields(fields: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """Validate a field mapping {role: column}; None means the Dolly-15k mapping.

    A mapping with ``messages`` is chat data (only ``category`` may go with it).
    """
    if fields is None:
        return dict(DOLLY_FIELDS)
    unknown = sorted(set(fields) - set(FIELD_ROLES))
    if unknown:
        raise DataError(f"unknown field role(s) {unknown} in fields; use {list(FIELD_ROLES)}")
    if fields.get("messages"):
        extra = sorted(set(fields) - {"messages", "category"})
        if extra:
            raise DataError(f"fields maps 'messages' (chat data) and {extra}; chat data takes only category")
        return {"messages": fields["messages"], "category": fields.get("category")}
    for role in REQUIRED_ROLES:
        if not fields.get(role):
            raise DataError(f"fields must map {role!r} to a column name, e.g. fields={DOLLY_FIELDS}")
    mapping: dict[str, str | None] = {role: fields.get(role) for role in FIELD_ROLES if role != "messages"}
    for role, column in mapping.items():
        if column is not None and not isinstance(column, str):
            raise DataError(f"fields[{role!r}] must be a column name, got {column!r}")
    return mapping


def _turn(where: str, i: int, turn: object) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: messages[{i}] must be an object with role and content")
    role, content = turn.get("role"), turn.get("content")
    if role not in CHAT_ROLES:
        raise DataError(f"{where}: messages[{i}] has role {role!r}; use one of {list(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: messages[{i}] content must be text, got {type(content).__name__}")
    return str(role), content


def chat_examples(
    records: Sequence[Located], fields: dict[str, str | None], source: str, *, strict: bool
) -> list[Example]:
    """Examples from chat records: ``messages`` is a list of ``{role, content}`` turns whose last
    is the assistant's answer (the target) after a user turn (the prompt); earlier turns are
    the example's ``history``. ``category`` (optional column) as for instruction records.
    """
    column, category_column = str(fields["messages"]), fields.get("category")
    if strict and category_column and not any(category_column in rec for _, rec in records):
        raise DataError(f"{source}: no record has the field {category_column!r} mapped to 'category'")
    examples = []
    for where, record in records:
        messages = record.get(column)
        if not isinstance(messages, list | tuple) or len(messages) < 2:
            raise DataError(f"{where}: field {column!r} must list at least a user and an assistant turn")
        turns = [_turn(where, i, turn) for i, turn in enumerate(messages)]
        if turns[-1][0] != "assistant" or turns[-2][0] != "user":
            raise DataError(f"{where}: {column!r} must end with a user turn and then the assistant's answer")
        category = field_text(record, category_column, where, required=False) if category_column else ""
        examples.append(
            Example(
                prompt=turns[-2][1],
                target=turns[-1][1],
                references=(turns[-1][1],),
                category=category,
                history=tuple(turns[:-2]),
            )
        )
    return examples


def record_examples(
    records: Sequence[Located], fields: Mapping[str, str | None] | None, source: str
) -> list[Example]:
    """Examples from instruction or chat records with the mapping ``fields`` (None: chat when
    every record has a ``messages`` field, else Dolly-15k's instruction fields)."""
    if fields is None and records and all("messages" in rec for _, rec in records):
        return chat_examples(records, dict(CHAT_FIELDS), source, strict=False)
    mapping = resolve_fields(fields)
    if "messages" in mapping:
        return chat_examples(records, mapping, source, strict=True)
    return instruction_examples(records, mapping, source, strict=fields is not None)


def instruction_examples(
    records: Sequence[Located], fields: dict[str, str | None], source: str, *, strict: bool
) -> list[Example]:
    """Examples from instruction records (instruction, optional input, output, category).

    With ``strict`` (a mapping the user gave), an optional column that no record has is
    an error (most likely a typo); with the default mapping it just stays empty.
    """
    for role in ("input", "category"):
        column = fields[role]
        if strict and column is not None and not any(column in rec for _, rec in records):
            raise DataError(
                f"{source}: no record has the field {column!r} mapped to {role!r}; "
                f"fix fields= or set fields[{role!r}] to None"
            )
    examples = []
    for where, record in records:
        instruction = field_text(record, str(fields["instruction"]), where)
        output = field_text(record, str(fields["output"]), where)
        input_column, category_column = fields["input"], fields["category"]
        context = field_text(record, input_column, where, required=False) if input_column else ""
        category = field_text(record, category_column, where, required=False) if category_column else ""
        examples.append(
            Example(
                prompt=join_prompt(instruction, context),
                target=output,
                references=(output,),
                category=category,
            )
        )
    return examples


def limit_records(records: list[Located], max_examples: int | None) -> list[Located]:
    if max_examples is None:
        return records
    if max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    return records[:max_examples]
