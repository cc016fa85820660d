"""A self-describing CLI (--version, config, config --keys, methods, help on every flag) and
packaging: one version source, files created with the user's umask."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import prelort
from prelort.cli import _parser, main
from prelort.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse's --version / --help
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


# -- version: one source --------------------------------------------------------------------------
def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"prelort {prelort.__version__}"
    assert importlib.metadata.version("prelort") == prelort.__version__


def test_the_package_reads_the_version_from_pyproject() -> None:
    # one source: [project].version (literal, as Flower reads it for `flwr run .`); the
    # package reads the installed metadata, and no source file writes the number again
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == prelort.__version__
    assert "version" not in project["project"].get("dynamic", [])
    assert project["project"]["version"] not in (ROOT / "src/prelort/__init__.py").read_text()
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX expression, not a table
    assert project["project"]["classifiers"]
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    )
    # the Flower app's pyproject needs a literal version (Flower reads it): it must agree
    app = tomllib.loads((ROOT / "src/prelort/flower/app/pyproject.toml").read_text())
    assert app["project"]["version"] == prelort.__version__


# -- help on every flag ----------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_subcommand_has_help() -> None:
    parser = _parser()
    subs = dict(_subparsers(parser))
    assert {"run", "compare", "export", "eval", "config", "methods"} <= set(subs)
    for name, sub in [("prelort", parser), *subs.items()]:
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {'/'.join(action.option_strings)} has no help text"


def test_compare_help_describes_its_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    rc, out, _ = _run(capsys, "compare", "--help")
    assert rc == 0
    compare = dict(_subparsers(_parser()))["compare"]
    flags = [a for a in compare._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert {f.option_strings[0] for f in flags} >= {
        "--config",
        "--methods",
        "--seeds",
        "--out",
        "--report-only",
    }
    for action in flags:
        line = next(x for x in out.splitlines() if x.strip().startswith(action.option_strings[0]))
        assert str(action.help).split("(")[0].strip() in line


# -- config and methods ----------------------------------------------------------------------------
def test_config_prints_the_resolved_config_as_toml(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(
        capsys, "config", "--config", str(ROOT / "configs/synthetic.toml"), "--set", "run.rounds=3"
    )
    assert rc == 0
    data = tomllib.loads(out)
    assert data["run"]["rounds"] == 3
    expected = load_config(ROOT / "configs/synthetic.toml", ["run.rounds=3"])
    assert data["train"]["lr"] == expected.train.lr and data["clients"]["levels"] == expected.clients.levels
    rc, _, err = _run(capsys, "config", "--set", "run.rounds=zero")
    assert rc == 2 and "run.rounds" in err


def test_config_keys_lists_every_key_with_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    from prelort.config_doc import MEANINGS, config_keys

    rc, out, _ = _run(capsys, "config", "--keys")
    assert rc == 0
    lines = out.splitlines()
    lr = next(i for i, x in enumerate(lines) if x.startswith("train.lr = "))
    assert lines[lr].startswith("train.lr = 0.001") and "(float)" in lines[lr]
    assert lines[lr + 1].startswith("    ") and "learning rate" in lines[lr + 1].lower()
    own = next(x for x in lines if x.startswith("train.own_weight = "))
    assert own.startswith("train.own_weight = 0.9")
    # a field's own docstring is used (config.py), e.g. run.min_clients
    i = next(i for i, x in enumerate(lines) if x.startswith("run.min_clients = 1"))
    assert "skipped" in lines[i + 1]
    keys = config_keys()
    assert all(k.doc for k in keys), [k.key for k in keys if not k.doc]
    assert set(MEANINGS) <= {k.key for k in keys}  # no meaning for a key that is gone
    assert any(k.key == "privacy.clip" for k in keys)  # the optional section is listed too
    for k in keys:
        assert any(x.startswith(f"{k.key} = ") for x in lines), k.key


def test_methods_lists_every_method_with_family_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from prelort.federation.methods import METHODS

    rc, out, _ = _run(capsys, "methods")
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in ("prelort", "flexlora"):
        assert name in rows
        assert METHODS[name].family in rows[name] and METHODS[name].summary in rows[name]
    assert set(METHODS) <= set(rows)


# -- files honour the umask ------------------------------------------------------------------------
@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_honours_the_umask(tmp_path: Path, umask_022: None) -> None:
    from prelort.reporting.files import atomic_write_text, umask_mode

    atomic_write_text(tmp_path / "results.json", "{}\n")
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert umask_mode(directory=True) == 0o755
    os.umask(0o027)
    atomic_write_text(tmp_path / "summary.md", "x")
    assert stat.S_IMODE((tmp_path / "summary.md").stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind
