"""The config's sections check themselves, and llm.source is checked against the data-source registry."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prelort.config import (
    ClientsSection,
    Config,
    HetLoRASection,
    LLMSection,
    LoRASection,
    PrivacySection,
    RunSection,
    SyntheticSection,
    TrainSection,
    WorkloadSection,
    config_from_dict,
)
from prelort.errors import ConfigError

BUILTIN_CHOICES = "'bbc-news', 'natural-instructions', 'multiple-choice', 'local', 'hub'"
TOPICS = ("sport", "tech")


def tiny_examples(n: int, prefix: str = "") -> list[Any]:
    """``n`` topic-classification examples shaped like the ``bbc-news`` source's."""
    from prelort.data import Example

    return [
        Example(
            prompt=f"{prefix}article {i}. What is the topic? Answer with one of: sport, tech.",
            target=TOPICS[i % 2],
            references=(TOPICS[i % 2],),
            choices=TOPICS,
            answer=i % 2,
            category=TOPICS[i % 2],
        )
        for i in range(n)
    ]


@pytest.fixture
def tiny_sources() -> Iterator[dict[str, Any]]:
    """Registers ``tiny-file`` (needs a path) and ``tiny-gen`` (no path); unregisters them after."""
    from prelort.data import SOURCES, register_source

    calls: dict[str, Any] = {}

    @register_source("tiny-file")
    def load_tiny_file(path: str, max_chars: int = 1500) -> list[Any]:
        calls["tiny-file"] = {"path": path, "max_chars": max_chars}
        return tiny_examples(12, prefix=Path(path).name[:max_chars] + ": ")

    @register_source("tiny-gen")
    def load_tiny_gen(split: str = "train") -> list[Any]:
        calls["tiny-gen"] = {"split": split}
        return tiny_examples(8)

    try:
        yield calls
    finally:
        SOURCES.pop("tiny-file", None)
        SOURCES.pop("tiny-gen", None)


def _llm(**llm: Any) -> dict[str, Any]:
    return {"workload": {"kind": "llm"}, "llm": {"test_examples": 2, **llm}}


def test_unknown_source_is_the_same_one_line_error() -> None:
    for value, shown in (("nope", "'nope'"), ("BBC-News", "'BBC-News'"), (5, "5")):
        with pytest.raises(ConfigError) as err:
            config_from_dict(_llm(source=value, path="x"))
        assert str(err.value) == f"llm.source = {shown} is not one of {BUILTIN_CHOICES}"
    # also without an llm workload, and before any other check of the config
    with pytest.raises(ConfigError, match=re.escape(f"llm.source = 'nope' is not one of {BUILTIN_CHOICES}")):
        config_from_dict({"llm": {"source": "nope"}, "run": {"rounds": 0}})
    with pytest.raises(ConfigError, match=re.escape("llm.source = 'nope' is not one of")):
        config_from_dict({}, ['llm.source="nope"'])


def test_every_builtin_source_is_selectable_and_path_rules_hold() -> None:
    for name in ("natural-instructions", "multiple-choice", "local", "hub"):
        assert config_from_dict(_llm(source=name, path="data")).llm.source == name
        with pytest.raises(ConfigError) as err:
            config_from_dict(_llm(source=name))
        assert str(err.value) == (
            f"llm.path is required for llm.source = {name!r} (a file, folder or hub id)"
        )
    assert config_from_dict(_llm(source="bbc-news")).llm.path == ""  # the installed corpus
    assert config_from_dict({"llm": {"source": "local"}}).llm.source == "local"  # synthetic run


def test_a_registered_source_is_selectable_from_a_config(
    tiny_sources: dict[str, Any], tmp_path: Path
) -> None:
    from prelort.data import load_source, partition_indices, train_test_split
    from prelort.workloads.llm import load_examples

    with pytest.raises(ConfigError) as err:
        config_from_dict(_llm(source="nope"))
    assert str(err.value) == f"llm.source = 'nope' is not one of {BUILTIN_CHOICES}, 'tiny-file', 'tiny-gen'"

    # a source with a required path needs llm.path, like the built-in file sources
    with pytest.raises(ConfigError, match=re.escape("llm.path is required for llm.source = 'tiny-file'")):
        config_from_dict(_llm(source="tiny-file"))
    cfg = config_from_dict(_llm(source="tiny-file", path=str(tmp_path / "news"), max_chars=3))
    assert cfg.llm.source == "tiny-file"
    examples = load_examples(cfg.llm)
    # it got the [llm] options it names, and nothing else
    assert tiny_sources["tiny-file"] == {"path": str(tmp_path / "news"), "max_chars": 3}
    assert examples == load_source("tiny-file", path=str(tmp_path / "news"), max_chars=3)
    assert len(examples) == 12 and examples[0].prompt.startswith("new: article 0")
    assert {ex.category for ex in examples} == set(TOPICS)

    # the rest of the LLM workload's data pipeline takes them as it takes a built-in source's
    train, test = train_test_split(len(examples), cfg.llm.test_examples / len(examples), 0)
    assert len(test) == 2 and sorted([*train, *test]) == list(range(12))
    parts = partition_indices([examples[i].category for i in train], 4, "iid", seed=0)
    assert sorted(i for p in parts for i in p) == list(range(len(train)))

    # a source without a path argument needs no llm.path, and gets its other options
    cfg = config_from_dict(_llm(source="tiny-gen", split="validation", max_examples=5))
    subset = load_examples(cfg.llm)
    assert tiny_sources["tiny-gen"] == {"split": "validation"}
    assert len(subset) == 5 and all(ex in tiny_examples(8) for ex in subset)


def test_an_unregistered_source_is_no_longer_selectable(tiny_sources: dict[str, Any]) -> None:
    from prelort.data import SOURCES

    assert config_from_dict(_llm(source="tiny-gen")).llm.source == "tiny-gen"
    loader = SOURCES.pop("tiny-gen")
    try:
        with pytest.raises(ConfigError, match=re.escape("llm.source = 'tiny-gen' is not one of")):
            config_from_dict(_llm(source="tiny-gen"))
    finally:
        SOURCES["tiny-gen"] = loader


def test_builtin_names_known_to_the_config_are_the_registered_loaders() -> None:
    from prelort.data import SOURCES, load_bbc_news, load_hub
    from prelort.source_registry import BUILTIN_MODULE, BUILTIN_SOURCES, source_names, takes_required_path

    assert [name for name in SOURCES if name in BUILTIN_SOURCES] == list(BUILTIN_SOURCES)
    for name, needs_path in BUILTIN_SOURCES.items():
        assert SOURCES[name].__module__ == BUILTIN_MODULE
        assert takes_required_path(SOURCES[name]) is needs_path, name
    assert SOURCES["bbc-news"] is load_bbc_news and SOURCES["hub"] is load_hub
    assert source_names()[: len(BUILTIN_SOURCES)] == tuple(BUILTIN_SOURCES)


def test_register_source_refuses_a_taken_name(tiny_sources: dict[str, Any]) -> None:
    from prelort.data import SOURCES, register_source

    before = dict(SOURCES)
    for name in ("tiny-file", "local", "bbc-news"):
        with pytest.raises(ValueError, match=f"data source {name!r} is already registered"):
            register_source(name)(lambda: tiny_examples(1))
    assert before == SOURCES


def test_checking_the_source_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from prelort.config import config_from_dict\n"
        "from prelort.errors import ConfigError\n"
        "config_from_dict({'workload': {'kind': 'llm'}, 'llm': {'source': 'hub', 'path': 'a/b'}})\n"
        "try:\n"
        "    config_from_dict({'llm': {'source': 'nope'}})\n"
        "    raise SystemExit('accepted')\n"
        "except ConfigError:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'prelort.data') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (RunSection(rounds=0), "run.rounds = 0 must be a positive integer"),
        (
            RunSection(min_clients=5, clients_per_round=4),
            "run.min_clients = 5 is more than run.clients_per_round = 4; no round could ever aggregate",
        ),
        (
            RunSection(client_timeout=-1.0),
            "run.client_timeout = -1.0 must be a finite number >= 0; 0 disables",
        ),
        (
            ClientsSection(levels=[4, 2]),
            "clients.levels = [4, 2] must be positive, strictly increasing ranks",
        ),
        (
            ClientsSection(num_clients=8, ranks=[2]),
            "clients.ranks has 1 entries for 8 clients; give one rank per client",
        ),
        (
            ClientsSection(ranks=[2] * 7 + [3]),
            "clients.ranks: rank(s) [3] not in clients.levels [2, 4, 8, 16]",
        ),
        (LoRASection(dropout=1.0), "lora.dropout = 1.0 must be a finite number in [0, 1)"),
        (
            LoRASection(target_modules=["q", " "]),
            "lora.target_modules[1] is empty; give module name suffixes",
        ),
        (TrainSection(lr=float("nan")), "train.lr = nan must be a finite number > 0"),
        (
            TrainSection(own_weight="equal", own_weight_final=0.5),
            "train.own_weight_final needs a numeric train.own_weight, got 'equal'",
        ),
        (TrainSection(distill=0.5), 'train.distill = 0.5 needs train.nested_mode = "sandwich" or "all"'),
        (HetLoRASection(gamma=1.0), "hetlora.gamma = 1.0 must be a finite number in (0, 1)"),
        (HetLoRASection(min_rank=0), "hetlora.min_rank = 0 must be a positive integer"),
        (
            SyntheticSection(min_examples=10, max_examples=5),
            "synthetic.max_examples = 5 is below synthetic.min_examples = 10; raise it",
        ),
        (LLMSection(source="nope"), f"llm.source = 'nope' is not one of {BUILTIN_CHOICES}"),
        (LLMSection(model=" "), "llm.model is empty"),
        (
            LLMSection(max_examples=10, test_examples=10),
            "llm.test_examples = 10 leaves no training examples out of llm.max_examples = 10",
        ),
        (PrivacySection(clip=0.0), "privacy.clip = 0.0 must be a finite number > 0"),
        (
            PrivacySection(clip=1.0, noise_multiplier=1.0),
            "privacy.clip = 1.0 needs privacy.delta (e.g. 1e-5, below 1 / clients)",
        ),
        (
            PrivacySection(noise_multiplier=1.0),
            "privacy.noise_multiplier needs privacy.clip (the L2 bound C of an update)",
        ),
        (PrivacySection(), "[privacy] enables nothing: set privacy.clip with privacy.noise_multiplier"),
    ],
)
def test_each_section_checks_itself(section: Any, message: str) -> None:
    """``message``: the start of today's one-line error."""
    with pytest.raises(ConfigError) as err:
        section.validate()
    assert str(err.value).startswith(message), str(err.value)
    cfg = Config(**{_section_name(section): section})
    with pytest.raises(ConfigError) as err:  # and Config.validate reports it
        cfg.validate()
    assert str(err.value).startswith(message), str(err.value)


def _section_name(section: Any) -> str:
    """The field of ``Config`` that holds a section of this class."""
    hints = typing.get_type_hints(Config)
    kind = type(section)
    return next(name for name, tp in hints.items() if tp is kind or kind in typing.get_args(tp))


def test_valid_sections_pass_and_cross_section_checks_stay_in_config() -> None:
    for section in (
        RunSection(),
        ClientsSection(),
        LoRASection(),
        TrainSection(),
        HetLoRASection(min_rank=99),
    ):
        section.validate()
    PrivacySection(secure_aggregation=True, secagg_bits=31).validate()  # bits against clients: Config's
    Config().validate()
    cross = [
        (
            Config(hetlora=HetLoRASection(min_rank=99)),
            "hetlora.min_rank = 99 is above the largest rank level 16",
        ),
        (
            Config(run=RunSection(clients_per_round=9)),
            "run.clients_per_round = 9 is more than clients.num_clients = 8; lower it or add clients",
        ),
        (Config(run=RunSection(eval_levels=[3])), "run.eval_levels: [3] not in clients.levels [2, 4, 8, 16]"),
        (
            Config(privacy=PrivacySection(secure_aggregation=True, secagg_bits=31)),
            "privacy.secagg_bits = 31 overflows SecAgg+'s 32-bit sums with 4 clients per round",
        ),
        (
            Config(run=RunSection(method="hetlora"), privacy=PrivacySection(secure_aggregation=True)),
            "[privacy] needs a method whose aggregation is a ratio of sums",
        ),
        (
            Config(run=RunSection(clients_per_round=1), privacy=PrivacySection(secure_aggregation=True)),
            "privacy.secure_aggregation needs run.clients_per_round >= 2",
        ),
        (
            Config(workload=WorkloadSection(kind="llm"), llm=LLMSection(source="local")),
            "llm.path is required for llm.source = 'local' (a file, folder or hub id)",
        ),
    ]
    for cfg, message in cross:
        with pytest.raises(ConfigError) as err:
            cfg.validate()
        assert str(err.value).startswith(message), str(err.value)
