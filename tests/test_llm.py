"""LLM workload pieces on a tiny random LLaMA built in the test: metrics, evaluator, workload."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prelort.config import config_from_dict, load_config
from prelort.data import Example, collate, encode_example
from prelort.evaluation import (
    LMEvaluator,
    accuracy,
    answer_nll,
    batch_choice_logprobs,
    choice_logprobs,
    greedy_generate,
    rouge_l,
)
from prelort.federation import run_simulation

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 120


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def full_logprob(model: torch.nn.Module, prompt: list[int], cont: list[int]) -> float:
    """Independent reference: one forward over prompt + continuation, no cache."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(cont)))


def test_rouge_l_hand_cases() -> None:
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l("dog", ["the cat sat"]) == 0.0
    # LCS("a b c d", "a c") = 2: P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3
    assert rouge_l("a b c d", ["a c"]) == pytest.approx(2 / 3)
    assert rouge_l("a b c d", ["x", "a c", "zz"]) == pytest.approx(2 / 3)  # best over references


def test_accuracy() -> None:
    assert accuracy([1, 2, 0, 0], [1, 2, 1, 0]) == 0.75
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_choice_logprobs_with_shared_cache_equal_full_forwards() -> None:
    model = tiny_llama()
    prompt = [5, 9, 13, 2, 7]
    choices = [[3, 1], [4, 8, 1], [11], [6, 6, 6, 1]]
    got = choice_logprobs(model, prompt, choices, pad_id=1)
    expect = [full_logprob(model, prompt, c) for c in choices]
    assert got == pytest.approx(expect, abs=1e-4)


def test_batch_choice_logprobs_left_padded_equal_full_forwards() -> None:
    model = tiny_llama()
    prompts = [[5, 9, 13, 2, 7], [8], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    choices = [[[3, 1], [4, 8, 1], [11]], [[6, 6, 6, 1], [2]], [[40, 1], [41, 42, 1], [43, 1], [44]]]
    got = batch_choice_logprobs(model, prompts, choices, pad_id=1)
    expect = [[full_logprob(model, p, c) for c in cs] for p, cs in zip(prompts, choices, strict=True)]
    assert len(got) == 3
    for g, e in zip(got, expect, strict=True):
        assert g == pytest.approx(e, abs=1e-4)


def test_answer_nll_matches_manual_cross_entropy() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    exs = [Example(words(3, 4, 5), words(6, 7), (words(6, 7),)), Example(words(8), words(9), (words(9),))]
    feats = [encode_example(tok, e, 64) for e in exs]
    total, n = answer_nll(model, collate(feats, 1))
    manual, count = 0.0, 0
    for f in feats:
        p = f["labels"].count(-100)
        manual -= full_logprob(model, f["input_ids"][:p], f["input_ids"][p:])
        count += len(f["input_ids"]) - p
    assert n == count == 3 + 2
    assert total == pytest.approx(manual, rel=1e-4)


def test_answer_loss_equals_full_logits_loss_and_runs_lm_head_on_answer_positions_only() -> None:
    from peft import LoraConfig, get_peft_model

    from prelort.training import answer_loss

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, q in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(q, std=0.1)  # non-zero B so LoRA gradients reach A too
    tok = tiny_tokenizer()
    exs = [
        Example(words(*range(3, 15)), words(20, 21, 22), (words(20),)),
        Example(words(8, 9), words(30, 31), (words(30),)),
        Example(words(*range(40, 47)), words(50), (words(50),)),
    ]
    feats = [encode_example(tok, e, 64) for e in exs]
    batch = collate(feats, 1)
    T = batch["input_ids"].shape[1]
    lora = [q for n, q in model.named_parameters() if "lora_" in n]

    # reference: every position's logits, manual mean cross-entropy over labelled next tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["labels"][:, 1:]
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    ref = (nll * (tgt != -100)).sum() / (tgt != -100).sum()
    ref_grads = torch.autograd.grad(ref, lora)

    rows: list[int] = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    loss = answer_loss(model, batch)
    hook.remove()
    grads = torch.autograd.grad(loss, lora)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)
    # the LM head saw the union over rows of the positions t whose next token is labelled
    spans = [set(range(f["labels"].count(-100) - 1, len(f["labels"]) - 1)) for f in feats]
    assert rows == [len(set().union(*spans))] and rows[0] < T - 1


def test_answer_token_nll_without_logits_to_keep_equals_with_it() -> None:
    from prelort.training.lm_loss import answer_token_nll

    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model, tok = tiny_llama(), tiny_tokenizer()
    exs = [Example(words(3, 4, 5, 6), words(7, 8), (words(7),)), Example(words(9), words(10), (words(10),))]
    batch = collate([encode_example(tok, e, 64) for e in exs], 1)
    for reduction in ("mean", "sum"):
        with_keep = answer_token_nll(model, batch, reduction)
        without = answer_token_nll(NoKeep(model), batch, reduction)
        assert float(without) == pytest.approx(float(with_keep), rel=1e-5)


def test_greedy_generate_left_padded_batch_equals_manual_argmax() -> None:
    model = tiny_llama()
    prompts = [[5, 9, 13], [7, 2, 3, 4, 10, 11]]

    def manual(p: list[int], n: int) -> list[int]:
        ids = list(p)
        out = []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 1:
                break
            out.append(nxt)
            ids.append(nxt)
        return out

    got = greedy_generate(model, prompts, max_new_tokens=5, pad_id=1, eos_id=1)
    assert got == [manual(p, 5) for p in prompts]


def test_evaluator_perplexity_from_choices_equals_separate_pass() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    choices = (words(20), words(21, 22), words(23))
    exs = [
        Example(words(i, i + 1, i + 2), choices[i % 3], (choices[i % 3],), choices, i % 3) for i in range(6)
    ]
    ev = LMEvaluator(tok, exs, max_length=32)
    assert ev.target_is_answer == set(range(6))
    fast = ev(model)
    ev.target_is_answer = set()
    slow = ev(model)
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-4)
    assert fast["accuracy"] == slow["accuracy"]
    assert fast["perplexity"] == pytest.approx(math.exp(fast["loss"]))


def _write_mc(path: Path, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        ans = i % 3
        rows.append(
            {
                "definition": "pick",
                "input": words(10 + i % 40, 50 + ans),
                "choices": ["w90", "w91", "w92"],
                "answer": ans,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _write_dolly(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "instruction": words(3, i % 30),
            "context": "",
            "response": words(40 + i % 5, 41),
            "category": f"c{i % 4}",
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _llm_cfg(model_dir: Path, method: str, llm: dict[str, Any]):
    return config_from_dict(
        {
            "run": {"method": method, "rounds": 2, "clients_per_round": 2, "eval_every": 1},
            "clients": {"num_clients": 3, "levels": [2, 4, 8]},
            "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "nested_mode": "all"},
            "workload": {"kind": "llm"},
            "llm": {
                "model": str(model_dir),
                "max_length": 48,
                "test_examples": 8,
                "eval_batch_size": 4,
                **llm,
            },
        }
    )


@pytest.mark.parametrize("method", ["prelort", "flexlora", "flora"])
def test_llm_workload_federated_rounds_on_tiny_llama(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    from prelort.workloads import build_workload

    cfg = _llm_cfg(
        tiny_dir,
        method,
        {"source": "multiple-choice", "path": str(_write_mc(tmp_path / "mc.jsonl")), "partition": "iid"},
    )
    wl = build_workload(cfg)
    assert wl.target_modules == ["q_proj", "v_proj"]
    assert sum(wl.num_examples(k) for k in range(3)) == 48 - 8  # test split held out
    res = run_simulation(cfg, wl)
    for lv in ("2", "4", "8"):
        m = res["final"]["per_rank"][lv]
        assert set(m) == {"loss", "perplexity", "accuracy"}
        assert all(math.isfinite(v) for v in m.values())
    assert res["rounds"][-1]["per_rank"]["8"]["loss"] != res["rounds"][0]["per_rank"]["8"]["loss"]


def test_llm_workload_generation_task_reports_rouge(tiny_dir: Path, tmp_path: Path) -> None:
    from prelort.workloads import build_workload

    cfg = _llm_cfg(
        tiny_dir,
        "segment",
        {
            "source": "local",
            "path": str(_write_dolly(tmp_path / "d.jsonl")),
            "partition": "dirichlet",
            "rouge": True,
            "max_new_tokens": 4,
        },
    )
    res = run_simulation(cfg, build_workload(cfg))
    m = res["final"]["per_rank"]["4"]
    assert set(m) == {"loss", "perplexity", "rouge_l"} and 0.0 <= m["rouge_l"] <= 1.0


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRELORT_DATA_DIR", "/data")
    cfg = load_config(path)
    assert cfg.run.method == "prelort"
    assert cfg.run.clients_per_round <= cfg.clients.num_clients


@pytest.mark.slow
@pytest.mark.integration
def test_real_smollm2_two_federated_rounds_on_bbc_slice() -> None:
    """SmolLM2-135M from its PyPI package (cached as safetensors), 2 rounds of prelort."""
    from prelort.workloads import build_workload

    cfg = config_from_dict(
        {
            "run": {"method": "prelort", "rounds": 2, "clients_per_round": 2, "eval_every": 2},
            "clients": {"num_clients": 3, "levels": [2, 4, 8]},
            "train": {"steps": 1, "batch_size": 2, "nested_mode": "sample"},
            "workload": {"kind": "llm"},
            "llm": {
                "model": "smollm2-135m",
                "source": "bbc-news",
                "max_chars": 200,
                "max_examples": 40,
                "test_examples": 6,
                "max_length": 96,
                "partition": "iid",
            },
        }
    )
    wl = build_workload(cfg)
    res = run_simulation(cfg, wl)
    for lv in ("2", "4", "8"):
        m = res["final"]["per_rank"][lv]
        assert {"loss", "perplexity", "accuracy"} <= set(m)
        assert all(math.isfinite(v) for v in m.values())
    assert res["rounds"][-1]["bytes_up"] > 0
