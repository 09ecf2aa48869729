"""Every code block of README.md and docs/*.md runs (issue 25), with sybil.

* Python blocks run in order, one namespace per file; what a snippet leaves to the user (``MyCNN``, a
  loader, a checkpoint) comes from a hidden setup block in the page (``<!-- invisible-code-block: python``)
  marked ``# stand-in``, from :mod:`tests.docs_standins`.
* Training runs at a ``--quick`` size: ``pl.Trainer`` is capped at 2 epochs / 10 steps and 2 batches per
  epoch (what the docs show stays as printed; only its length shrinks).
* Shell blocks: every ``lightning-interp`` line is parsed by the command's own parser; ``demo`` and ``fit``
  lines also run at a quick size. Install lines and ``scripts/`` lines are not run here (the scripts' ``--quick``
  runs are in ``tests/test_scripts.py``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(page: Path) -> Iterator[tuple[str, int, str]]:
    """``(language, line, text)`` of every fenced block of ``page``."""
    lang, start, lines = None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if match and lang is None:
            lang, start, lines = match.group(1), number, []
        elif line.startswith("```") and lang is not None:
            yield lang, start, "\n".join(lines)
            lang = None
        elif lang is not None:
            lines.append(line)


@pytest.fixture
def quick_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Caps every ``pl.Trainer`` at a quick size and runs in a temporary folder (the snippets write logs)."""
    import lightning.pytorch as pl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    original = pl.Trainer.__init__

    def capped(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["max_epochs"] = min(kwargs.get("max_epochs") or 2, 2)
        kwargs["max_steps"] = min(kwargs.get("max_steps", -1) if kwargs.get("max_steps", -1) > 0 else 10, 10)
        kwargs.setdefault("limit_train_batches", 2)
        kwargs.setdefault("limit_val_batches", 2)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("enable_checkpointing", False)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", capped)


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, _, _ in _blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[p.name for p in PYTHON_PAGES])
def test_python_blocks_run(page: Path, quick_trainer: None) -> None:
    document = Sybil(parsers=[PythonCodeBlockParser()]).parse(page)
    examples = list(document)
    shown = [line for lang, line, _ in _blocks(page) if lang == "python"]
    # Every printed block is an example (the hidden setup blocks come on top of them).
    assert {e.line for e in examples} >= set(shown), f"{page.name}: blocks at lines {shown} not all collected"
    for example in examples:
        try:
            example.evaluate()
        except Exception as err:
            raise AssertionError(f"{page.name}, block at line {example.line}: {type(err).__name__}: {err}") from err


def test_every_page_with_code_is_covered() -> None:
    """A new page's Python block is collected without a change here (the glob), and none is skipped."""
    for page in PAGES:
        assert "skip: next" not in page.read_text(), f"{page.name} skips a block"
    assert {p.name for p in PYTHON_PAGES} >= {"README.md", "posterior.md", "saliency.md", "ablation.md"}


def _command_lines() -> list[tuple[str, int, list[str]]]:
    out = []
    for page in PAGES:
        for lang, start, text in _blocks(page):
            if lang not in ("bash", "sh", "console", "shell"):
                continue
            for offset, line in enumerate(text.splitlines(), 1):
                line = line.split(" #", 1)[0].strip()
                if line.startswith("lightning-interp "):
                    out.append((page.name, start + offset, shlex.split(line)[1:]))
    return out


COMMANDS = _command_lines()
QUICK = {
    "demo": ["--max-steps", "10", "--epochs", "1", "--logger", "csv", "--presets", "1", "--parts", "posterior"],
    "fit": ["--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
}


@pytest.mark.parametrize("page,line,args", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_command_lines(page: str, line: int, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_interp.cli import audit_parser, demo_parser, main

    monkeypatch.chdir(tmp_path)  # from any folder: the packaged configs are found by name
    monkeypatch.setenv("WANDB_MODE", "offline")
    command, rest = args[0], [a for a in args[1:] if a not in ("[--ckpt", "last.ckpt]")]  # [optional] parts of usage lines
    if command == "audit":
        parsed = audit_parser().parse_args(rest)  # the files are the user's: the line must parse
        assert parsed.out
    elif command == "demo":
        demo_parser().parse_args(rest)
        main(["demo", *rest, *QUICK["demo"], "--out", str(tmp_path / "demo")])
        assert (tmp_path / "demo" / "summary.json").is_file()
    elif command == "fit":
        main([*args, *QUICK["fit"]])
    else:
        raise AssertionError(f"{page}:{line}: no check for `lightning-interp {command}`")
