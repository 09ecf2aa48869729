"""The registry of methods (issue 24): one list, and every consumer reads it.

The entry point, the report, the audit and the demo must name exactly the methods of
``lightning_interp.methods.METHODS``; a record added there (monkeypatched here) must reach them without
another edit. The records' references must be the ones the docs cite.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_interp import methods
from lightning_interp.methods import METHODS, Method

ROOT = Path(__file__).resolve().parents[1]
FIVE = ["posterior_gap", "saliency", "ablation", "correlation", "expansion"]


class FakeProbeCallback(pl.Callback):
    """A sixth method's callback, for the monkeypatched registry."""

    prefix = "fake"

    def __init__(self, width: int, every_n_epochs: int = 1) -> None:
        self.width, self.every_n_epochs = width, every_n_epochs


FAKE = Method(
    key="fake",
    title="Fake method",
    paper='Nobody (2099). "A fake method." arXiv 9999.99999.',
    intro="The fake method (Nobody, 2099) measures nothing. Its numbers mean nothing.",
    callback_path="tests.test_methods:FakeProbeCallback",
    measure_path="tests.test_methods:measure_fake",
    example_arguments={"width": 3},
)


def measure_fake(model: Any, inputs: Any, labels: Any = None, *, generator: Any = None) -> None:
    """The fake method's entry function."""


@pytest.fixture
def sixth(monkeypatch: pytest.MonkeyPatch) -> Method:
    monkeypatch.setattr(methods, "METHODS", (*METHODS, FAKE))
    return FAKE


# ---------------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------------


def test_the_registry_lists_the_five_methods_in_order() -> None:
    assert [m.key for m in METHODS] == FIVE == methods.keys()
    assert len({m.part for m in METHODS}) == len(METHODS)  # parts are report keys and demo names: unique


def test_callbacks_resolve_and_their_prefix_is_the_key() -> None:
    from lightning_interp import callbacks

    for m in METHODS:
        cls = m.callback
        assert cls is getattr(callbacks, m.callback_name), m.key
        assert cls.prefix == m.key, m.key  # type: ignore[attr-defined]
        assert m.measure_path.endswith(f":measure_{m.key}"), m.measure_path
        assert m.measure_path.startswith(f"lightning_interp.{m.part}:"), m.measure_path  # the method's own module


def test_measure_functions_resolve() -> None:
    # The entry functions of issue 24: every record's ``measure`` is a function of its method module named
    # measure_<key>, with the shared signature, returning a <Key>Result that has scalars() and tables().
    import typing

    from lightning_interp.results import MethodResult

    for m in METHODS:
        fn = m.measure
        assert callable(fn) and fn.__name__ == f"measure_{m.key}", m.key
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "inputs", "labels"] and "generator" in params, m.key
        assert params["labels"].default is None and params["generator"].kind is inspect.Parameter.KEYWORD_ONLY, m.key
        returned = typing.get_type_hints(fn)["return"]
        assert returned.__name__ == "".join(w.title() for w in m.key.split("_")) + "Result", m.key
        assert callable(returned.scalars) and callable(returned.tables), m.key
        assert issubclass(returned, MethodResult), m.key


def test_a_wrong_path_names_the_record_and_the_fix() -> None:
    broken = dataclasses.replace(FAKE, measure_path="tests.test_methods:measure_nothing")
    with pytest.raises(AttributeError, match=r"'tests.test_methods:measure_nothing'.*has no measure_nothing"):
        broken.measure  # noqa: B018
    with pytest.raises(ValueError, match=r"unknown method 'gradcam'; .* posterior_gap, saliency, ablation"):
        methods.find("gradcam")


def test_lookups() -> None:
    from lightning_interp.callbacks import PosteriorGapCallback

    assert methods.find("posterior") is methods.find("posterior_gap") is methods.find("PosteriorGapCallback")

    class Mine(PosteriorGapCallback):  # a user's subclass is still the posterior gap
        pass

    assert methods.for_callback(Mine) is methods.find("posterior_gap")
    assert methods.for_callback(pl.Callback()) is None


def test_papers_are_the_references_the_docs_cite() -> None:
    for m in METHODS:
        text = (ROOT / "docs" / f"{m.part}.md").read_text()
        found = re.search(r"\*\*Paper:\*\* (.+?)\n\n", text, re.S)
        assert found, f"docs/{m.part}.md has no **Paper:** line"
        assert " ".join(found.group(1).split()) == m.paper, m.key
        year = re.search(r"\((\d{4})\)", m.paper)
        assert year and year.group(1) in m.intro, f"{m.key}: the intro cites the paper's year"


def test_importing_the_registry_imports_nothing_heavy() -> None:
    code = "import sys, lightning_interp.methods as m; [r.callback_name for r in m.METHODS]; print(sorted(sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    for heavy in ("torch", "lightning", "captum", "matplotlib"):
        assert f"'{heavy}'" not in loaded, heavy


# ---------------------------------------------------------------------------------------------
# Every consumer reads the registry
# ---------------------------------------------------------------------------------------------


def test_consumers_list_exactly_the_registry() -> None:
    from lightning_interp import audit, demo, entry_points, report
    from lightning_interp.audit_options import AUDIT_METHODS

    keys = [m.key for m in METHODS]
    assert list(report.intros()) == keys
    assert set(entry_points._registry()) == set(keys) | {m.callback_name for m in METHODS}
    assert list(demo.PARTS) == [m.part for m in METHODS]
    assert all(callable(getattr(demo._Demo, part, None)) for part in demo.PARTS)  # every part has its runner
    assert audit.CALLBACK_KEYS == {m.callback_name: m.part for m in METHODS}
    assert AUDIT_METHODS == audit.METHODS == ("saliency", "weights", "ablation", "correlation")
    assert set(AUDIT_METHODS) - {"weights"} <= set(keys)


def test_a_sixth_record_reaches_the_entry_point_and_the_report(sixth: Method, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_interp import entry_points, report

    assert "fake" in entry_points._registry() and "FakeProbeCallback" in entry_points._registry()
    assert entry_points.required_arguments("fake") == ["width"]
    monkeypatch.setenv(entry_points.ENV_VAR, "fake")
    with pytest.raises(ValueError, match=re.escape("""[{"name": "fake", "width": 3}]""")):  # its example argument
        entry_points.callbacks_factory()
    monkeypatch.setenv(entry_points.ENV_VAR, '[{"name": "fake", "width": 5}]')
    (built,) = entry_points.callbacks_factory()
    assert isinstance(built, FakeProbeCallback) and built.width == 5
    assert report.intros()["fake"] == sixth.intro
    assert report.intro(built) == report.intro("fake") == sixth.intro
    built.history, built.figure_dir, built.last = [{"score": 1.0, "score_se": 0.5}], None, None  # type: ignore[attr-defined]
    section = report.callback_section(built, ".")
    assert section.intro == sixth.intro and section.scalars == [("score", 1.0, 0.5)]


def test_the_config_audit_keys_a_sixth_method_by_its_part(sixth: Method, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_interp import audit

    monkeypatch.setattr(methods, "METHODS", (*METHODS, dataclasses.replace(FAKE, part="fk")))
    assert audit._report_key(FakeProbeCallback(1)) == "fk"
    assert audit._report_key(methods.find("posterior_gap").callback()) == "posterior"


# ---------------------------------------------------------------------------------------------
# The audit's options: declared once
# ---------------------------------------------------------------------------------------------


def test_the_command_and_the_keywords_are_the_same_options() -> None:
    from lightning_interp.audit import run_audit
    from lightning_interp.audit_options import AuditOptions
    from lightning_interp.cli import audit_parser

    parser = audit_parser()
    fields = {f.name: f for f in dataclasses.fields(AuditOptions)}
    dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert dests == {name for name, f in fields.items() if f.metadata["cli"]}
    # the flags' defaults are the keywords' defaults
    given = AuditOptions.from_cli(parser.parse_args(["--images", "imgs", "--out", "o"]))
    assert given == AuditOptions(images="imgs", out="o")
    flags = ["--arch", "resnet18", "--grayscale", "--wandb", "--methods", "saliency,weights", "--deletion-images", "0",
             "--mean", "0.5", "--resize", "none", "--crop", "24", "--out", "o"]  # fmt: skip
    assert AuditOptions.from_cli(parser.parse_args(flags)) == AuditOptions(
        arch="resnet18", channels=1, use_wandb=True, methods=("saliency", "weights"), deletion_images=None,
        mean=[0.5], resize="none", crop=24, out="o",
    )  # fmt: skip
    # run_audit's keywords are the fields, with their defaults
    params = inspect.signature(run_audit).parameters
    assert [p for p in params if p != "options"] == list(fields)
    assert all(params[n].default == f.default for n, f in fields.items())
    with pytest.raises(TypeError, match=r"unknown audit option.* batchsize; the options are arch"):
        run_audit(images="imgs", batchsize=3)


def test_callbacks_and_measure_functions_share_their_defaults() -> None:
    # a setting a callback passes on to measure_<key> has one default: the callback's may not drift from the function's
    shared_any = False
    for m in METHODS:
        fn_params = inspect.signature(m.measure).parameters
        cb_params = inspect.signature(m.callback.__init__).parameters
        empty = inspect.Parameter.empty  # a required argument of either side has no default to compare
        shared = [n for n in cb_params if n in fn_params and empty not in (fn_params[n].default, cb_params[n].default)]
        shared_any = shared_any or bool(shared)
        for name in shared:
            assert cb_params[name].default == fn_params[name].default, (m.key, name)
    assert shared_any
