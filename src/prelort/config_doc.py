"""Every config key with its type, default and meaning, read from ``prelort.config`` itself.

The meanings are the attribute docstrings of the section dataclasses (a string literal right
after a field), read with ``ast`` from the module's source, so the listing cannot drift from
the code. Pure: imports no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import typing
from dataclasses import dataclass
from typing import Any

from prelort import config as config_module

MEANINGS: dict[str, str] = {
    "run.method": "The method: an aggregation rule plus local training (`prelort methods` lists them).",
    "run.seed": "Seed of the run: rank assignment, sampling, initialisation and (by default) the data.",
    "run.rounds": "Number of federated rounds.",
    "run.clients_per_round": "Clients sampled per round.",
    "run.eval_every": "Evaluate the global adapter every this many rounds (and after the last).",
    "clients.num_clients": "Number of clients in the population.",
    "clients.levels": "The rank levels L, strictly increasing; R = the largest (the global adapter's rank).",
    "clients.rank_distribution": "How capacities are drawn from the levels without clients.ranks: ``cycle``"
    " round-robin, ``uniform``, or ``heavy-tail`` (level j with probability proportional to 2^-j).",
    "lora.alpha": "LoRA alpha of the scale s(r).",
    "lora.scaling": "s(r): ``fixed`` alpha / R for every r, ``per_rank`` alpha / r (PEFT), ``rslora``"
    " alpha / sqrt(r).",
    "lora.dropout": "LoRA dropout on the adapter input during local training.",
    "train.steps": "Local optimiser steps (or passes, see ``budget``) per client per round.",
    "train.lr": "Learning rate of the clients' AdamW.",
    "train.weight_decay": "AdamW weight decay of the LoRA factors.",
    "train.batch_size": "Examples per local step.",
    "train.max_grad_norm": "Clip each step's gradient to this L2 norm (None: no clipping).",
    "hetlora.gamma": "HetLoRA's decay factor: the last (1 - gamma) r_k rank dimensions are regularised"
    " and pruned.",
    "hetlora.lam": "HetLoRA's regularisation weight lambda on the pruned tail.",
    "workload.kind": "``synthetic`` (low-rank teacher regression, seconds) or ``llm`` (the [llm] section).",
    "synthetic.d_in": "Input dimension of the frozen MLP.",
    "synthetic.hidden": "Hidden width of the frozen MLP (fc1, fc2: the LoRA targets).",
    "synthetic.d_out": "Output dimension of the frozen MLP.",
    "synthetic.teacher_rank": "Rank of the teacher's change to fc1 and fc2.",
    "synthetic.teacher_scale": "Largest singular value of the teacher's change.",
    "synthetic.spectrum_decay": "Singular value i of the teacher's change is teacher_scale * decay^i.",
    "synthetic.min_examples": "Fewest training examples of a client.",
    "synthetic.max_examples": "Most training examples of a client.",
    "synthetic.test_examples": "Size of the pooled test set.",
    "synthetic.input_shift": "Spread of the client input means (non-IID inputs; 0: IID).",
    "llm.dtype": "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.",
    "llm.device": "auto (CUDA when available), cpu, cuda or cuda:N.",
    "llm.source": "The dataset source (see the README's table of sources).",
    "llm.split": "hub: the dataset split to read.",
    "llm.max_per_task": "Natural Instructions: at most this many examples per task (0: all).",
    "llm.max_chars": "BBC News: articles cut to this many characters.",
    "llm.partition": "How examples are split over clients: iid, dirichlet over the category, or whole tasks.",
    "llm.dirichlet_alpha": "Concentration of the Dirichlet partition (smaller: more skewed clients).",
    "llm.tasks_per_client": "``task`` partition: tasks per client.",
    "llm.test_examples": "Held-out test examples no client trains on.",
    "llm.max_length": "Tokens per training example (longer ones are cut).",
    "llm.max_new_tokens": "Greedy generation length for ROUGE-L.",
    "llm.eval_batch_size": "Batch size of evaluation.",
}
"""Meanings of the keys whose field has no attribute docstring in ``prelort.config`` (a field's
own docstring wins; ``tests/test_cli_describe.py`` checks that every key has one or the other)."""


@dataclass(frozen=True)
class KeyDoc:
    """One config key: ``section.name``, its type, default and docstring ("" if none)."""

    key: str
    type: str
    default: Any
    doc: str


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a class: the string literal right after each annotated field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section field type (``PrivacySection | None`` -> PrivacySection)."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _type_name(tp: Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    return text.replace("typing.", "")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def sections() -> list[tuple[str, str]]:
    """``(section, its class docstring)`` in the order of ``Config``'s fields."""
    hints = typing.get_type_hints(config_module.Config)
    out = []
    for f in dataclasses.fields(config_module.Config):
        cls = _section_class(hints[f.name])
        if cls is not None:
            out.append((f.name, inspect.cleandoc(cls.__doc__ or "")))
    return out


def config_keys() -> list[KeyDoc]:
    """Every key of the config, section by section in ``Config``'s order."""
    hints = typing.get_type_hints(config_module.Config)
    keys: list[KeyDoc] = []
    for section in dataclasses.fields(config_module.Config):
        cls = _section_class(hints[section.name])
        if cls is None:
            continue
        docs = _attribute_docs(cls)
        field_types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            keys.append(
                KeyDoc(
                    key,
                    _type_name(field_types[f.name]),
                    _default(f),
                    docs.get(f.name) or MEANINGS.get(key, ""),
                )
            )
    return keys


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    return config_module.toml_value(value)


def describe_keys() -> str:
    """The text of ``prelort config --keys``: per section, ``key = default  (type)`` and its meaning."""
    by_section: dict[str, list[KeyDoc]] = {}
    for k in config_keys():
        by_section.setdefault(k.key.split(".", 1)[0], []).append(k)
    lines: list[str] = []
    for name, doc in sections():
        lines.append(f"# {doc.splitlines()[0] if doc else f'[{name}]'}")
        for k in by_section.get(name, []):
            lines.append(f"{k.key} = {_toml_value(k.default)}  ({k.type})")
            for line in k.doc.splitlines():
                lines.append(f"    {line}")
        lines.append("")
    return "\n".join(lines)
