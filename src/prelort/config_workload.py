"""The workload sections of the run configuration: ``[workload]``, ``[synthetic]``, ``[llm]``.

Split from ``prelort.config_sections`` (the federation's own sections); each section's
``validate`` checks its own values and raises ``ConfigError`` with one line naming the key and
the fix. Re-exported by ``prelort.config``. Pure: imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from prelort.config_checks import _choice, _int_at_least, _real, _seed
from prelort.errors import ConfigError
from prelort.source_registry import source_names


@dataclass
class SyntheticSection:
    """[synthetic]: frozen random MLP and a low-rank teacher change with a decaying spectrum."""

    d_in: int = 32
    hidden: int = 64
    d_out: int = 16
    teacher_rank: int = 16
    teacher_scale: float = 1.0
    spectrum_decay: float = 0.75
    min_examples: int = 64
    max_examples: int = 256
    test_examples: int = 1024
    input_shift: float = 1.0
    data_seed: int | None = None
    """Seed of the data (teacher, client data, test set); None: the run's seed."""

    def validate(self) -> None:
        """Checks of [synthetic]."""
        for key in ("d_in", "hidden", "d_out", "teacher_rank", "min_examples", "test_examples"):
            _int_at_least(f"synthetic.{key}", getattr(self, key), 1)
        if self.max_examples < self.min_examples:
            raise ConfigError(
                f"synthetic.max_examples = {self.max_examples} is below synthetic.min_examples = "
                f"{self.min_examples}; raise it"
            )
        _int_at_least("synthetic.max_examples", self.max_examples, 1)
        _real("synthetic.teacher_scale", self.teacher_scale, lo=0.0, lo_open=True)
        _real("synthetic.spectrum_decay", self.spectrum_decay, lo=0.0, hi=1.0, lo_open=True)
        _real("synthetic.input_shift", self.input_shift, lo=0.0)
        if self.data_seed is not None:
            _seed("synthetic.data_seed", self.data_seed)


@dataclass
class LLMSection:
    """[llm]: a causal LM fine-tuned on a real dataset (used when workload.kind = "llm")."""

    model: str = "smollm2-135m"
    """Alias (smollm2-135m, gemma3-270m), local HF model folder or hub id."""
    dtype: str = "auto"
    device: str = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Base weights in 4-bit NF4 (QLoRA: double quantisation, compute in llm.dtype) or 8-bit
    through bitsandbytes; needs a CUDA device and the bitsandbytes package."""
    cache_dir: str = ""
    """Where converted models are cached; empty: $PRELORT_CACHE or ~/.cache/prelort."""
    source: str = "bbc-news"
    """A data source registered in ``prelort.data.SOURCES`` (``prelort.source_registry``): the
    built-in ones are in the README's table of sources; ``register_source`` adds more."""
    path: str = ""
    """File or folder of the source ($VARS expanded); hub: the dataset id."""
    tasks: list[str] = field(default_factory=list)
    """Natural Instructions: the task names to use (empty: all)."""
    fields: dict[str, str] = field(default_factory=dict)
    """local / hub: role -> column (instruction, input, output, category)."""
    split: str = "train"
    """hub: the split ``datasets.load_dataset`` returns."""
    name: str = ""
    """hub: the dataset's configuration name (``datasets.load_dataset(path, name)``); empty: none."""
    data_files: list[str] = field(default_factory=list)
    """hub: ``data_files`` of ``datasets.load_dataset`` (with llm.path = json / csv / parquet)."""
    eval_source: str = ""
    """A separate evaluation set: a registered source, read with llm.eval_path / llm.eval_split
    and the same fields (llm.test_examples of it, a seeded sample); empty: llm.test_examples
    are held out of llm.source."""
    eval_path: str = ""
    """File, folder or dataset id of llm.eval_source (empty: llm.path)."""
    eval_split: str = ""
    """Split of llm.eval_source (empty: llm.split)."""
    eval_data_files: list[str] = field(default_factory=list)
    """``data_files`` of llm.eval_source (empty: llm.data_files)."""
    max_per_task: int = 0
    max_examples: int = 0
    """Random subset of this many examples before splitting (0: all)."""
    max_chars: int = 1500
    partition: Literal["iid", "dirichlet", "task"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    tasks_per_client: int = 2
    test_examples: int = 100
    max_length: int = 256
    max_new_tokens: int = 32
    eval_batch_size: int = 8
    rouge: bool = False
    """Generate greedily and report ROUGE-L (instruction tasks)."""
    data_seed: int | None = None
    """Seed of the subset, partition and test split; None: the run's seed."""

    CHOICES: ClassVar[dict[str, Callable[[], Sequence[str]]]] = {
        "source": source_names,
        "eval_source": lambda: ("", *source_names()),
    }
    """Keys whose choices are known only when the config is read (a registry): the config
    loader checks them as it checks a ``Literal``'s, before their type."""

    def validate(self) -> None:
        """Checks of [llm] (``path`` with the workload: ``Config.validate``)."""
        _choice("llm.source", self.source, source_names())
        _choice("llm.eval_source", self.eval_source, ("", *source_names()))
        if not self.model.strip():
            raise ConfigError("llm.model is empty; give an alias (smollm2-135m), a model folder or a hub id")
        _int_at_least("llm.max_per_task", self.max_per_task, 0, hint="0: all")
        _int_at_least("llm.max_examples", self.max_examples, 0, hint="0: all")
        for key in ("max_chars", "tasks_per_client", "test_examples", "max_length", "max_new_tokens"):
            _int_at_least(f"llm.{key}", getattr(self, key), 1)
        _int_at_least("llm.eval_batch_size", self.eval_batch_size, 1)
        _real("llm.dirichlet_alpha", self.dirichlet_alpha, lo=0.0, lo_open=True)
        if self.max_examples and not self.eval_source and self.test_examples >= self.max_examples:
            raise ConfigError(
                f"llm.test_examples = {self.test_examples} leaves no training examples out of "
                f"llm.max_examples = {self.max_examples}; raise llm.max_examples (or 0: all)"
            )
        if self.data_seed is not None:
            _seed("llm.data_seed", self.data_seed)


@dataclass
class WorkloadSection:
    """[workload]: which task the federation trains on."""

    kind: Literal["synthetic", "llm"] = "synthetic"

    def validate(self) -> None:
        """Nothing beyond the choice of ``kind``."""
