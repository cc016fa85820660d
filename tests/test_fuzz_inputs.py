"""Malformed input, every time: one clear line and exit 2, no silent wrong result, no lost result.

One test group per bullet of issue #14's "Why":

- tracebacks: ``--out`` on a file / read-only folder, unreadable or undecodable config,
  ``eval --out`` on a folder, zero / negative sizes, malformed checkpoint state files,
  damaged PEFT adapters, file-system errors anywhere (the top-level handler);
- wrong results with exit 0: NaN / Inf / negative rates and limits, ``hetlora.min_rank = 0``,
  a corrupted global adapter;
- lost results: two processes on one ``--out``, ``--resume`` of a finished run.

Commands run in-process (``prelort.cli.main``) on a tiny synthetic workload; hypothesis
drives the numeric config fields and the byte corruption of checkpoints and adapters.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prelort.cli import main
from prelort.config import Config, config_from_dict, load_config
from prelort.errors import ConfigError, UserError
from prelort.federation.artifacts import ADAPTER_FILE, load_global
from prelort.federation.checkpoint import CheckpointError, load_checkpoint
from prelort.lock import LOCK_FILE, LockedError, run_lock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthetic.toml")
TINY = [
    "run.rounds=2",
    "run.eval_every=1",
    "clients.num_clients=4",
    "run.clients_per_round=2",
    "clients.levels=[2,4]",
    "train.steps=1",
    "synthetic.d_in=8",
    "synthetic.hidden=8",
    "synthetic.d_out=4",
    "synthetic.teacher_rank=4",
    "synthetic.test_examples=32",
    "synthetic.min_examples=16",
    "synthetic.max_examples=32",
]
SETS = [a for s in TINY for a in ("--set", s)]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_permissions = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("prelort: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and mtime (ns)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (2 rounds, checkpoints of rounds 1 and 2) and a rank-2 export."""
    base = tmp_path_factory.mktemp("fuzz")
    run = base / "run"
    assert main(["run", "--config", CONFIG, "--out", str(run), "--quiet", *SETS]) == 0
    assert main(["export", "--run", str(run), "--rank", "2", "--out", str(base / "adapter")]) == 0
    return run


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


@pytest.fixture
def adapter_copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(finished.parent / "adapter", dst)
    return dst


# -- 1. numeric config fields: valid or one ConfigError, never anything else ----------------------
def _numeric_fields() -> list[tuple[str, str]]:
    """(dotted key, "int" | "float") for every numeric field of every section."""
    out = []
    config_hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        # a section's class: the field's type, or the dataclass inside ``Section | None``
        cls = next(
            t
            for t in (typing.get_args(config_hints[section.name]) or (config_hints[section.name],))
            if dataclasses.is_dataclass(t)
        )
        hints = typing.get_type_hints(cls)
        for name, tp in hints.items():
            args = set(typing.get_args(tp)) or {tp}
            if float in args:
                out.append((f"{section.name}.{name}", "float"))
            elif int in args:
                out.append((f"{section.name}.{name}", "int"))
    return out


NUMERIC = _numeric_fields()
BAD_NUMBERS = st.sampled_from([0, -1, -5, 1, 2**63, -(2**63), 0.0, -0.0, -1.0, 1e-300, 1e300])
ANY_NUMBER = st.one_of(
    st.integers(-10, 10),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    BAD_NUMBERS,
)


def test_numeric_fields_are_found() -> None:
    keys = {k for k, _ in NUMERIC}
    for key in ("train.lr", "lora.alpha", "train.max_grad_norm", "run.client_timeout", "hetlora.min_rank"):
        assert key in keys
    assert len(keys) >= 40


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(NUMERIC), ANY_NUMBER), min_size=1, max_size=3))
def test_random_numeric_config_is_valid_or_one_config_error(edits: list[tuple[tuple[str, str], Any]]) -> None:
    data: dict[str, dict[str, Any]] = {}
    for (key, kind), value in edits:
        section, name = key.split(".")
        if kind == "int" and isinstance(value, float):
            value = int(value) if math.isfinite(value) and abs(value) < 2**70 else 0
        data.setdefault(section, {})[name] = value
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and any(k.split(".")[1] in msg for (k, _), _ in edits), msg
        return
    # valid: every number is finite and every size usable
    for part in dataclasses.fields(cfg):
        section = getattr(cfg, part.name)
        if section is None:  # an optional section left out ([privacy])
            continue
        for field, number in dataclasses.asdict(section).items():
            if isinstance(number, float):
                assert math.isfinite(number), (part.name, field, number)
    s = cfg.synthetic
    assert min(s.d_in, s.hidden, s.d_out, s.teacher_rank, s.test_examples) >= 1
    assert cfg.train.lr > 0 and cfg.lora.alpha > 0
    assert cfg.hetlora.min_rank is not None and 1 <= cfg.hetlora.min_rank <= cfg.max_rank
    assert cfg.train.max_grad_norm is None or cfg.train.max_grad_norm > 0
    assert cfg.llm.max_examples >= 0 and cfg.llm.max_per_task >= 0


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(-2, 6),
    hidden=st.integers(-2, 6),
    d_out=st.integers(-2, 4),
    teacher_rank=st.integers(-1, 5),
    test_examples=st.integers(-1, 8),
    spectrum_decay=st.floats(allow_nan=True, allow_infinity=True),
)
def test_accepted_synthetic_sizes_build_a_working_workload(**sizes: Any) -> None:
    """No size reaches the numerics unchecked: a valid one builds, a bad one is a ConfigError."""
    from prelort.workloads import build_workload

    sets = [*TINY, *(f"synthetic.{k}={v}" for k, v in sizes.items())]
    try:
        cfg = config_from_dict({}, sets)
    except ConfigError:
        return
    wl = build_workload(cfg)
    metrics = wl.evaluate(wl.build_model())
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("synthetic.d_in=0", "synthetic.d_in"),
        ("synthetic.teacher_rank=0", "synthetic.teacher_rank"),
        ("synthetic.hidden=-1", "synthetic.hidden"),
        ("synthetic.test_examples=0", "synthetic.test_examples"),
        ("llm.max_examples=-5", "llm.max_examples"),
        ("llm.max_per_task=-1", "llm.max_per_task"),
        ("llm.max_new_tokens=0", "llm.max_new_tokens"),
        ("llm.tasks_per_client=0", "llm.tasks_per_client"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("lora.alpha=nan", "lora.alpha"),
        ("lora.alpha=inf", "lora.alpha"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("run.max_update_norm=nan", "run.max_update_norm"),
        ("run.client_timeout=nan", "run.client_timeout"),
        ("run.client_timeout=-inf", "run.client_timeout"),
        ("hetlora.min_rank=0", "hetlora.min_rank"),
        ("hetlora.min_rank=99", "hetlora.min_rank"),
        ("hetlora.lam=-0.5", "hetlora.lam"),
        ("hetlora.gamma=nan", "hetlora.gamma"),
        ("lora.dropout=nan", "lora.dropout"),
        ("train.own_weight=nan", "train.own_weight"),
        ("synthetic.spectrum_decay=inf", "synthetic.spectrum_decay"),
        ("llm.dirichlet_alpha=nan", "llm.dirichlet_alpha"),
        ("run.seed=-1", "run.seed"),
    ],
)
def test_issue_values_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, key: str
) -> None:
    rc, _, err = _run(
        capsys, "run", "--config", CONFIG, "--out", str(tmp_path / "o"), *SETS, "--set", override
    )
    _one_line_error(rc, err, key)
    assert not (tmp_path / "o").exists()  # nothing was started


def test_config_validation_imports_no_torch() -> None:
    code = (
        "import sys; from prelort.config import config_from_dict; config_from_dict({}); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


# -- 2. file-system and damaged-file errors: one line naming the path ----------------------------
def test_out_naming_an_existing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "results"
    f.write_text("keep me")
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(f), *SETS)
    _one_line_error(rc, err, str(f), "not a folder")
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(f / "sub"), *SETS)
    _one_line_error(rc, err, str(f))
    rc, _, err = _run(capsys, "compare", "--config", CONFIG, "--out", str(f), "--methods", "prelort", *SETS)
    _one_line_error(rc, err, str(f))
    assert f.read_text() == "keep me"


@needs_permissions
def test_out_in_a_read_only_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(ro / "run"), *SETS)
        _one_line_error(rc, err, "not writable")
        rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(ro), *SETS)
        _one_line_error(rc, err, "not writable")
    finally:
        ro.chmod(0o755)


@needs_permissions
def test_unreadable_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    shutil.copy(CONFIG, cfg)
    cfg.chmod(0)
    rc, _, err = _run(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    _one_line_error(rc, err, str(cfg), "ermission")


def test_unreadable_config_and_read_only_out_even_as_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same two cases with the permission errors simulated (root ignores permissions)."""
    cfg = tmp_path / "c.toml"
    shutil.copy(CONFIG, cfg)
    read_text = Path.read_text

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == cfg:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    rc, _, err = _run(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    _one_line_error(rc, err, str(cfg), "Permission denied", "permissions")
    monkeypatch.undo()
    ro, access = tmp_path / "ro", os.access
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else access(p, mode))
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(ro / "run"), *SETS)
    _one_line_error(rc, err, str(ro), "not writable")
    assert list(ro.iterdir()) == []


def test_config_that_is_a_folder_or_not_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "run", "--config", str(tmp_path), "--out", str(tmp_path / "o"))
    _one_line_error(rc, err, str(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[run]\nrounds = \xff\xfe\x00\n")
    rc, _, err = _run(capsys, "run", "--config", str(bad), "--out", str(tmp_path / "o"))
    _one_line_error(rc, err, str(bad))


def test_eval_out_naming_a_folder(capsys: pytest.CaptureFixture[str], finished: Path, tmp_path: Path) -> None:
    rc, out, err = _run(capsys, "eval", "--run", str(finished), "--out", str(tmp_path))
    _one_line_error(rc, err, str(tmp_path), "is a folder")
    assert out == ""  # refused before evaluating
    target = tmp_path / "m.json"
    rc, _, err = _run(capsys, "eval", "--run", str(finished), "--out", str(target))
    assert rc == 0 and json.loads(target.read_text())["2"]["loss"] > 0, err


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/train.jsonl"), "/data/train.jsonl"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/folder"), "give a file path"),
        (FileExistsError(errno.EEXIST, "File exists", "/out/x"), "/out/x"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/out/f/x"), "/out/f/x"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/results.json"), "disk space"),
        (OSError("Can't load the model from /models/m: config.json missing"), "/models/m"),
        (json.JSONDecodeError("Expecting value", "{", 1), "damaged input file"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "damaged"),
    ],
)
def test_top_level_handler_turns_operational_errors_into_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, exc: Exception, needle: str
) -> None:
    import prelort.cli as cli

    def boom(args: Any) -> int:
        raise exc

    monkeypatch.setattr(cli, "_cmd_eval", boom)
    rc, _, err = _run(capsys, "eval", "--run", "x")
    _one_line_error(rc, err, needle)


def test_top_level_handler_damaged_safetensors_and_unexpected_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    import prelort.cli as cli

    def damaged(args: Any) -> int:
        raise SafetensorError("Error while deserializing header: header too small")

    monkeypatch.setattr(cli, "_cmd_eval", damaged)
    _one_line_error(*_run(capsys, "eval", "--run", "x")[::2], "header too small")

    def bug(args: Any) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_cmd_eval", bug)
    with pytest.raises(ZeroDivisionError):  # unexpected errors keep their traceback
        main(["eval", "--run", "x"])


# -- 3. damaged PEFT adapters for `prelort eval --adapter` ---------------------------------------
def _edit_config(d: Path, **changes: Any) -> None:
    conf = json.loads((d / "adapter_config.json").read_text())
    conf.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(conf))


def _edit_weights(d: Path, fn: Any) -> None:
    from safetensors.torch import load_file, save_file

    w = d / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(w)).items()}
    save_file(fn(tensors), str(w))


def _replace_by_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_text("x")


def _first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


DAMAGE = {
    "truncated": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:150]
    ),
    "empty": lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
    "missing weights": lambda d: (d / "adapter_model.safetensors").unlink(),
    "bad json": lambda d: (d / "adapter_config.json").write_text("{nope"),
    "json list": lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
    "not lora": lambda d: _edit_config(d, peft_type="IA3"),
    "rank zero": lambda d: _edit_config(d, r=0),
    "wrong target": lambda d: _edit_config(d, target_modules=["nosuch"]),
    "fewer targets": lambda d: _edit_config(d, target_modules=["fc1"]),
    "rank mismatch": lambda d: _edit_config(d, r=4),
    "shape mismatch": lambda d: _edit_weights(
        d, lambda t: {**t, _first(t, "lora_A"): t[_first(t, "lora_A")][:, :-1].contiguous()}
    ),
    "missing factor": lambda d: _edit_weights(
        d, lambda t: {k: v for k, v in t.items() if k != _first(t, "lora_B")}
    ),
    "foreign module": lambda d: _edit_weights(
        d, lambda t: {k.replace("fc1", "encoder.q"): v for k, v in t.items()}
    ),
    "nan": lambda d: _edit_weights(
        d, lambda t: {**t, _first(t, "lora_B"): torch.full_like(t[_first(t, "lora_B")], math.nan)}
    ),
    "not a folder": lambda d: _replace_by_file(d),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_adapter_for_eval_is_one_line(
    capsys: pytest.CaptureFixture[str], finished: Path, adapter_copy: Path, damage: str
) -> None:
    DAMAGE[damage](adapter_copy)
    rc, out, err = _run(capsys, "eval", "--run", str(finished), "--adapter", str(adapter_copy))
    _one_line_error(rc, err, str(adapter_copy))
    assert out == ""


def test_intact_adapter_evaluates(
    capsys: pytest.CaptureFixture[str], finished: Path, adapter_copy: Path
) -> None:
    rc, out, err = _run(capsys, "eval", "--run", str(finished), "--adapter", str(adapter_copy))
    assert rc == 0, err
    assert json.loads(out)["adapter"]["loss"] > 0


# -- 4. checkpoints: schema, checksums, fallback, leftovers ---------------------------------------
def _state_json(run: Path, round_: int) -> Path:
    return run / "checkpoints" / f"round-{round_:06d}" / "state.json"


def _rehash(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with a valid own checksum (a malformed file that passes its checksum)."""
    from prelort.federation.checkpoint import _meta_digest

    meta = dict(meta)
    meta["sha256"] = _meta_digest(meta)
    return meta


MALFORMED = {
    "a list": lambda m: [m],
    "missing key": lambda m: _rehash({k: v for k, v in m.items() if k not in ("client_ranks", "sha256")}),
    "round is text": lambda m: _rehash({**m, "round": "2"}),
    "round negative": lambda m: _rehash({**m, "round": -1}),
    "client_ranks not ints": lambda m: _rehash({**m, "client_ranks": ["a"] * len(m["client_ranks"])}),
    "client_ranks too few": lambda m: _rehash({**m, "client_ranks": m["client_ranks"][:1]}),
    "client_ranks zero": lambda m: _rehash({**m, "client_ranks": [0] * len(m["client_ranks"])}),
    "client_ranks bools": lambda m: _rehash({**m, "client_ranks": [True] * len(m["client_ranks"])}),
    "rounds not records": lambda m: _rehash({**m, "rounds": [1, 2, 3]}),
    "rounds empty": lambda m: _rehash({**m, "rounds": []}),
    "edited without checksum": lambda m: {**m, "client_ranks": list(reversed(m["client_ranks"]))},
    "tensor checksum wrong": lambda m: _rehash({**m, "files": {"state.safetensors": "0" * 64}}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_state_file_falls_back_to_previous_checkpoint(run_copy: Path, kind: str) -> None:
    cfg = load_config(run_copy / "config.toml")
    newest = _state_json(run_copy, 2)
    newest.write_text(json.dumps(MALFORMED[kind](json.loads(newest.read_text()))))
    logged: list[str] = []
    loaded = load_checkpoint(run_copy, cfg, log=logged.append)
    assert loaded is not None and loaded[0].round == 1
    assert any("round-000002" in line for line in logged), logged
    older = _state_json(run_copy, 1)
    older.write_text(json.dumps(MALFORMED[kind](json.loads(older.read_text()))))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_copy, cfg)
    assert "\n" not in str(info.value) and "no usable checkpoint" in str(info.value)


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    return bytes(buf)


@FUZZ
@given(
    name=st.sampled_from(["state.json", "state.safetensors"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
)
def test_random_checkpoint_corruption_falls_back_or_is_identical(
    finished: Path,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    edits: list[tuple[int, int]],
    cut: int | None,
) -> None:
    run = tmp_path_factory.mktemp("ck")
    shutil.copytree(finished / "checkpoints", run / "checkpoints")
    cfg = load_config(finished / "config.toml")
    original = load_checkpoint(finished, cfg)
    assert original is not None
    target = run / "checkpoints" / "round-000002" / name
    data = _flip(target.read_bytes(), edits)
    target.write_bytes(data[:cut] if cut is not None else data)
    logged: list[str] = []
    state, rounds = load_checkpoint(run, cfg, log=logged.append) or (None, None)
    assert state is not None
    if state.round == 2:  # the change did not alter what is restored (e.g. JSON whitespace)
        assert rounds == original[1] and state.client_ranks == original[0].client_ranks
        for mod, pair in state.adapter.items():
            assert torch.equal(pair.A, original[0].adapter[mod].A)
            assert torch.equal(pair.B, original[0].adapter[mod].B)
    else:
        assert state.round == 1 and logged


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_random_global_adapter_corruption_is_refused_or_harmless(
    finished: Path, tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int]], cut: int | None
) -> None:
    run = tmp_path_factory.mktemp("ga")
    original, _ = load_global(finished)
    data = _flip((finished / ADAPTER_FILE).read_bytes(), edits)
    (run / ADAPTER_FILE).write_bytes(data[:cut] if cut is not None else data)
    try:
        adapter, _ = load_global(run)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(run / ADAPTER_FILE) in str(exc)
        return
    assert adapter.keys() == original.keys()  # accepted: then exactly the saved tensors
    for mod, pair in adapter.items():
        assert torch.equal(pair.A, original[mod].A) and torch.equal(pair.B, original[mod].B)


def test_corrupted_global_adapter_is_not_exported(
    capsys: pytest.CaptureFixture[str], run_copy: Path, tmp_path: Path
) -> None:
    f = run_copy / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # one bit of one weight
    f.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "export", "--run", str(run_copy), "--rank", "2", "--out", str(tmp_path / "a"))
    _one_line_error(rc, err, "checksum")
    assert not (tmp_path / "a").exists()
    rc, _, err = _run(capsys, "eval", "--run", str(run_copy))
    _one_line_error(rc, err, "checksum")


def test_leftovers_of_a_killed_writer_are_removed(run_copy: Path) -> None:
    ck = run_copy / "checkpoints"
    (ck / ".round-000003.abc123").mkdir()
    (ck / ".round-000003.abc123" / "state.safetensors").write_bytes(b"half")
    (ck / ".LATEST.x1y2.tmp").write_text("round-0000")
    (run_copy / ".results.json.k3j4.tmp").write_text("{")
    (run_copy / ".global_adapter.safetensors.q9.tmp").write_bytes(b"\0" * 10)
    logged: list[str] = []
    loaded = load_checkpoint(run_copy, load_config(run_copy / "config.toml"), log=logged.append)
    assert loaded is not None and loaded[0].round == 2
    assert not [p for p in run_copy.rglob(".*") if p.name != ".prelort.lock"]
    assert len(logged) == 4 and all("interrupted" in line for line in logged)


def test_latest_names_the_checkpoint_tried_first(run_copy: Path) -> None:
    cfg, latest = load_config(run_copy / "config.toml"), run_copy / "checkpoints" / "LATEST"
    assert latest.read_text() == "round-000002"
    latest.write_text("round-000001")  # killed between a folder's rename and LATEST's update
    loaded = load_checkpoint(run_copy, cfg)
    assert loaded is not None and loaded[0].round == 1
    latest.write_bytes(b"\xff\x00garbage")
    logged: list[str] = []
    loaded = load_checkpoint(run_copy, cfg, log=logged.append)
    assert loaded is not None and loaded[0].round == 2 and len(logged) == 1


def test_resume_with_damaged_newest_checkpoint_ends_identical(
    capsys: pytest.CaptureFixture[str], finished: Path, run_copy: Path
) -> None:
    (run_copy / "results.json").unlink()  # as if killed after round 2's checkpoint
    tensors = run_copy / "checkpoints" / "round-000002" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    rc, _, err = _run(capsys, "run", "--resume", str(run_copy), "--quiet")
    assert rc == 0, err
    ref = json.loads((finished / "results.json").read_text())
    res = json.loads((run_copy / "results.json").read_text())
    assert res["final"] == ref["final"] and [r.get("per_rank") for r in res["rounds"]] == [
        r.get("per_rank") for r in ref["rounds"]
    ]
    assert (run_copy / ADAPTER_FILE).read_bytes() == (finished / ADAPTER_FILE).read_bytes()


def test_resume_with_no_usable_checkpoint_is_one_line(
    capsys: pytest.CaptureFixture[str], run_copy: Path
) -> None:
    (run_copy / "results.json").unlink()
    for r in (1, 2):
        _state_json(run_copy, r).write_text("{}")
    rc, _, err = _run(capsys, "run", "--resume", str(run_copy), "--quiet")
    _one_line_error(rc, err, "no usable checkpoint")


# -- 5. lost results: one run per folder, finished runs untouched ---------------------------------
def test_resume_of_a_finished_run_changes_nothing(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    before, folder_mtime = _tree(run_copy), run_copy.stat().st_mtime_ns
    rc, out, err = _run(capsys, "run", "--resume", str(run_copy), "--quiet")
    assert rc == 0, err
    assert "already finished" in out
    assert _tree(run_copy) == before  # results.json byte-identical, nothing rewritten
    assert run_copy.stat().st_mtime_ns == folder_mtime  # not even a lock file came and went


def test_run_on_a_finished_folder_is_refused(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    before = _tree(run_copy)
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(run_copy), *SETS)
    _one_line_error(rc, err, "--resume")
    assert _tree(run_copy) == before


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Another process that takes ``folder``'s lock and keeps it until its stdin closes."""
    code = (
        "import sys; from prelort.lock import run_lock\n"
        f"with run_lock({str(folder)!r}):\n    print('locked', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_on_the_same_out_is_refused(
    capsys: pytest.CaptureFixture[str], run_copy: Path, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"
    (run_copy / "results.json").unlink()  # a killed run, to be resumed
    before = _tree(run_copy)
    holders = [_holder(fresh), _holder(run_copy)]
    try:
        rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(fresh), *SETS, "--quiet")
        _one_line_error(rc, err, f"process {holders[0].pid}", "in use")
        rc, _, err = _run(capsys, "run", "--resume", str(run_copy), "--quiet")
        _one_line_error(rc, err, "in use")
        rc, _, err = _run(
            capsys, "compare", "--config", CONFIG, "--out", str(run_copy), "--methods", "prelort", *SETS
        )
        _one_line_error(rc, err, "in use")
    finally:
        for h in holders:
            h.communicate(timeout=30)  # closes stdin: the holder releases its lock and exits
    assert _tree(run_copy) == before
    assert not (fresh / "results.json").exists()
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(fresh), *SETS, "--quiet")
    assert rc == 0, err
    assert not (fresh / LOCK_FILE).exists()  # released on exit


def test_stale_lock_of_a_killed_process_is_taken_over(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind
    rc, _, err = _run(capsys, "run", "--config", CONFIG, "--out", str(out), *SETS, "--quiet")
    assert rc == 0, err
    assert "stale lock" in err and str(holder.pid) in err
    assert not (out / LOCK_FILE).exists()


def test_lock_is_released_on_any_exit(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("crash inside the run")
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match="in use"), run_lock(tmp_path):
            pass  # pragma: no cover
        assert path.exists()  # the refused attempt did not remove the holder's lock
    assert not path.exists()
    assert isinstance(LockedError("x"), UserError)
