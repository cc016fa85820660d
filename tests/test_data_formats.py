"""Any dataset (issue #20, item 5): parquet and the other ``datasets.load_dataset`` formats with
``name`` / ``data_files`` / ``split``, chat ``messages`` data, and a separate evaluation set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prelort.config import config_from_dict
from prelort.data import DataError, Example, encode_example, format_prompt, load_source
from prelort.errors import ConfigError

ROWS = [
    {"instruction": "what is a", "context": "a b c", "response": "b", "category": "qa"},
    {"instruction": "say yes", "context": "", "response": "yes", "category": "chat"},
    {"instruction": "count", "context": "1 2", "response": "3", "category": "qa"},
]
EXPECTED = [("what is a\n\na b c", "b", "qa"), ("say yes", "yes", "chat"), ("count\n\n1 2", "3", "qa")]

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sum 1 2"},
            {"role": "assistant", "content": "3"},
        ],
        "category": "math",
    },
    {"messages": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}]},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def triples(examples: list[Example]) -> list[tuple[str, str, str]]:
    return [(e.prompt, e.target, e.category) for e in examples]


def test_local_parquet_is_read_through_load_dataset(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train.parquet", ROWS)
    assert triples(load_source("local", path=str(path))) == EXPECTED
    assert triples(load_source("local", path=str(path), max_examples=2)) == EXPECTED[:2]
    with pytest.raises(DataError, match=r"has no column\(s\) \['prompt'\]"):
        load_source("local", path=str(path), fields={"instruction": "prompt", "output": "response"})
    with pytest.raises(DataError, match="no such file"):
        load_source("local", path=str(tmp_path / "missing.parquet"))


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_hub_builders_with_data_files_and_split(tmp_path: Path, fmt: str) -> None:
    """``hub`` with a builder id and ``data_files`` is ``datasets.load_dataset(fmt, data_files=)``;
    a list of files is one ``train`` split, and another split is a one-line error."""
    suffix = "jsonl" if fmt == "json" else fmt
    first, second = tmp_path / f"a.{suffix}", tmp_path / f"b.{suffix}"
    for path, rows in ((first, ROWS[:2]), (second, ROWS[2:])):
        if fmt == "json":
            write_jsonl(path, rows)
        elif fmt == "parquet":
            write_parquet(path, rows)
        else:
            import csv

            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
                writer.writeheader()
                writer.writerows(rows)
    files = [str(first), str(second)]
    examples = load_source("hub", dataset_id=fmt, data_files=files, cache_dir=tmp_path / "cache")
    assert triples(examples) == EXPECTED  # an empty CSV cell is read as missing: no input part
    with pytest.raises(DataError, match=r"split 'test'"):
        load_source("hub", dataset_id=fmt, data_files=str(first), split="test", cache_dir=tmp_path / "cache")


def test_hub_name_selects_a_configuration_of_a_dataset_folder(tmp_path: Path) -> None:
    """A dataset folder whose README declares two configurations (the hub's own layout):
    ``name`` picks one, ``split`` one of its splits."""
    root = tmp_path / "ds"
    (root / "small").mkdir(parents=True)
    (root / "large").mkdir()
    write_jsonl(root / "small" / "train.jsonl", ROWS[:1])
    write_jsonl(root / "small" / "test.jsonl", ROWS[1:2])
    write_jsonl(root / "large" / "train.jsonl", ROWS)
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "  - split: test\n    path: small/test.jsonl\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train.jsonl\n---\n",
        encoding="utf-8",
    )
    cache = tmp_path / "cache"
    assert triples(load_source("hub", dataset_id=str(root), name="small", cache_dir=cache)) == EXPECTED[:1]
    small_test = load_source("hub", dataset_id=str(root), name="small", split="test", cache_dir=cache)
    assert triples(small_test) == EXPECTED[1:2]
    assert triples(load_source("hub", dataset_id=str(root), name="large", cache_dir=cache)) == EXPECTED
    with pytest.raises(DataError, match="could not load dataset"):
        load_source("hub", dataset_id=str(root), name="medium", cache_dir=cache)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_chat_messages_become_prompt_target_and_history(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"chat.{fmt}"
    write_jsonl(path, CHAT) if fmt == "jsonl" else write_parquet(path, CHAT)
    long, short = load_source("local", path=str(path))
    assert (long.prompt, long.target, long.references, long.category) == ("sum 1 2", "3", ("3",), "math")
    assert long.history == (("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    assert (short.prompt, short.target, short.history) == ("say yes", "yes", ())
    assert short.category == ""
    # an explicit mapping of another column name
    renamed = [{"turns": row["messages"]} for row in CHAT]
    other = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    again = load_source("local", path=str(other), fields={"messages": "turns"})
    assert [(e.prompt, e.target, e.history) for e in again] == [
        (e.prompt, e.target, e.history) for e in (long, short)
    ]


def test_chat_history_reaches_the_model_prompt() -> None:
    """With a chat template every earlier turn is rendered before the final user turn; without one
    they are ``role: content`` paragraphs before the plain template; the answer is labelled alone."""
    from test_data import make_tokenizer

    history = (("user", "hi"), ("assistant", "hello"))
    chat, plain = make_tokenizer(chat=True), make_tokenizer()
    assert (
        format_prompt(chat, "a b", history) == "<user> hi <end><user> hello <end><user> a b <end> <assistant>"
    )
    assert (
        format_prompt(plain, "a b", history)
        == "user: hi\n\nassistant: hello\n\n### Instruction:\na b\n### Response:\n"
    )
    ex = Example(prompt="a b", target="b", references=("b",), history=history)
    encoded = encode_example(chat, ex, max_length=64)
    answer = [*chat("b", add_special_tokens=False)["input_ids"], chat.eos_token_id]
    assert encoded["input_ids"][-len(answer) :] == answer
    assert encoded["labels"] == [-100] * (len(encoded["input_ids"]) - len(answer)) + answer


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "x"}], "at least a user and an assistant turn"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "end with a user turn"),
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "role 'robot'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "content must be text"),
        (["x", {"role": "assistant", "content": "y"}], r"messages\[0\] must be an object"),
    ],
)
def test_bad_chat_records_are_one_line_errors(tmp_path: Path, messages: list[Any], match: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT[1], {"messages": messages}])
    with pytest.raises(DataError, match=match) as err:
        load_source("local", path=str(path))
    assert "chat.jsonl:2" in str(err.value) and "\n" not in str(err.value)


def test_a_separate_evaluation_set(tmp_path: Path) -> None:
    """``llm.eval_source``: every training-source example trains; the test set is a seeded sample
    of ``llm.test_examples`` of the evaluation source (read with eval_path and eval_split)."""
    from prelort.workloads.llm import split_examples

    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test_rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(10)]
    test_file = write_parquet(tmp_path / "test.parquet", test_rows)
    base = {"workload": {"kind": "llm"}, "run": {"seed": 3}}
    llm = {"source": "local", "path": str(train_file), "test_examples": 4}
    cfg = config_from_dict({**base, "llm": {**llm, "eval_source": "local", "eval_path": str(test_file)}})
    train, test = split_examples(cfg.llm)
    assert triples(train) == EXPECTED
    prompts = [e.prompt for e in test]
    assert len(prompts) == 4 and len(set(prompts)) == 4 and set(prompts) <= {f"q{i}" for i in range(10)}
    assert prompts == sorted(prompts, key=lambda p: int(p[1:]))  # kept in file order
    assert [e.prompt for e in split_examples(cfg.llm)[1]] == prompts  # reproducible
    # without it the test set is held out of the training source
    held = config_from_dict({**base, "llm": {**llm, "test_examples": 1}})
    train2, test2 = split_examples(held.llm)
    assert len(train2) == 2 and len(test2) == 1
    assert sorted(triples(train2 + test2)) == sorted(EXPECTED)
    # the same split of a hub builder: eval_split picks the other split
    data = tmp_path / "hubdata"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ROWS)
    write_jsonl(data / "test.jsonl", test_rows[:3])
    hub = {"source": "hub", "path": str(data), "test_examples": 5, "eval_source": "hub", "eval_split": "test"}
    train3, test3 = split_examples(config_from_dict({**base, "llm": hub}).llm)
    assert triples(train3) == EXPECTED and [e.prompt for e in test3] == ["q0", "q1", "q2"]
    # a builder with files: eval_data_files are the evaluation set's
    files = {"source": "hub", "path": "json", "data_files": [str(train_file)], "test_examples": 2}
    files |= {"eval_source": "hub", "eval_data_files": [str(data / "test.jsonl")]}
    train4, test4 = split_examples(config_from_dict({**base, "llm": files}).llm)
    assert triples(train4) == EXPECTED and {e.prompt for e in test4} < {"q0", "q1", "q2"} and len(test4) == 2


def test_eval_source_is_checked_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match=r"llm\.eval_source = 'nope' is not one of '', 'bbc-news'"):
        config_from_dict({"workload": {"kind": "llm"}, "llm": {"eval_source": "nope"}})
    with pytest.raises(ConfigError, match=r"llm\.eval_path is required for llm\.eval_source = 'local'"):
        config_from_dict({"workload": {"kind": "llm"}, "llm": {"eval_source": "local"}})
