"""The opt-in `lightning.pytorch.callbacks_factory` entry point."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_interp.callbacks import (
    AblationProbeCallback,
    CorrelationOrderCallback,
    FinalLayerSaliencyCallback,
    LogitExpansionCallback,
    PosteriorGapCallback,
)
from lightning_interp.entry_points import required_arguments
from lightning_interp.loggers import make_logger


def _callbacks() -> list:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False).callbacks


def test_nothing_is_added_when_the_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTNING_INTERP_CALLBACKS", raising=False)
    assert not any(type(c).__module__.startswith("lightning_interp") for c in _callbacks())


def test_names_and_json_add_configured_callbacks_to_an_unmodified_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", "posterior_gap, FinalLayerSaliencyCallback")
    found = [c for c in _callbacks() if type(c).__module__.startswith("lightning_interp")]
    assert [type(c) for c in found] == [PosteriorGapCallback, FinalLayerSaliencyCallback]
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", '[{"name": "ablation", "layers": ["net.1"], "every_n_epochs": 2}]')
    (ablation,) = [c for c in _callbacks() if isinstance(c, AblationProbeCallback)]
    assert ablation.layers == ["net.1"] and ablation.every_n_epochs == 2


def test_bad_specifications(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", "gradcam")
    with pytest.raises(ValueError, match=r"unknown callback 'gradcam'; use one of"):
        _callbacks()
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", "[{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        _callbacks()


@pytest.mark.parametrize(
    ("spec", "needs", "json_form"),
    [
        ("ablation", "ablation needs layers", """LIGHTNING_INTERP_CALLBACKS='[{"name": "ablation", "layers": ["net.1"]}]'"""),
        (
            "saliency,expansion",
            "expansion needs seq_len, num_states",
            """LIGHTNING_INTERP_CALLBACKS='[{"name": "expansion", "seq_len": 8, "num_states": 4}]'""",
        ),
        (
            '[{"name": "LogitExpansionCallback", "seq_len": 5}]',
            "LogitExpansionCallback needs num_states (given: seq_len)",
            """LIGHTNING_INTERP_CALLBACKS='[{"name": "LogitExpansionCallback", "seq_len": 5, "num_states": 4}]'""",
        ),
    ],
    ids=["ablation", "expansion", "class-name-partial"],
)
def test_a_name_without_its_required_arguments_names_them_and_the_json_form(
    spec: str, needs: str, json_form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", spec)
    with pytest.raises(ValueError) as info:
        _callbacks()
    message = str(info.value)
    assert message.startswith("LIGHTNING_INTERP_CALLBACKS: "), message
    assert needs in message and json_form in message, message
    # The example in the message is itself a working specification.
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", json_form.split("=", 1)[1].strip("'"))
    (built,) = [c for c in _callbacks() if isinstance(c, LogitExpansionCallback | AblationProbeCallback)]
    assert type(built).__name__ in message or built.prefix in message


def test_required_arguments_come_from_the_signatures() -> None:
    assert required_arguments("ablation") == ["layers"]
    assert required_arguments("AblationProbeCallback") == ["layers"]
    assert required_arguments("expansion") == ["seq_len", "num_states"]
    for name in ("posterior_gap", "saliency", "correlation"):
        assert required_arguments(name) == [], name
    with pytest.raises(ValueError, match=r"unknown callback 'gradcam'; use one of \[.*'ablation'"):
        required_arguments("gradcam")


def test_names_without_required_arguments_build_from_bare_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", "posterior_gap,saliency,correlation")
    found = [type(c) for c in _callbacks() if type(c).__module__.startswith("lightning_interp")]
    assert found == [PosteriorGapCallback, FinalLayerSaliencyCallback, CorrelationOrderCallback]


@pytest.mark.parametrize(
    ("entry", "in_message", "cause"),
    [
        ({"name": "saliency", "probe_size": "x"}, ["could not build saliency (FinalLayerSaliencyCallback)", "'x'"], None),
        (
            {"name": "correlation", "bogus": 1},
            ["could not build correlation (CorrelationOrderCallback)", "CorrelationOrderCallback has no argument(s) bogus"],
            TypeError,
        ),
        (
            {"name": "posterior_gap", "task": "xie"},
            ["could not build posterior_gap (PosteriorGapCallback)", "GenerativeTask"],
            TypeError,
        ),
    ],
    ids=["bad-value", "unknown-kwarg", "task-not-json"],
)
def test_arguments_the_constructor_rejects_give_a_value_error_naming_the_variable(
    entry: dict, in_message: list[str], cause: type[Exception] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_INTERP_CALLBACKS", json.dumps([entry]))
    with pytest.raises(ValueError) as info:
        _callbacks()
    message = str(info.value)
    assert message.startswith("LIGHTNING_INTERP_CALLBACKS: "), message
    for text in in_message:
        assert text in message, (text, message)
    assert f"""LIGHTNING_INTERP_CALLBACKS='[{{"name": "{entry["name"]}\"""" in message, message
    assert isinstance(info.value.__cause__, TypeError | ValueError)
    if cause is not None:
        assert isinstance(info.value.__cause__, cause)


def test_the_tensorboard_logger_names_the_extra_when_tensorboard_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec
    asked: list[str] = []

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        asked.append(name)
        return None if name in ("tensorboard", "tensorboardX") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=re.escape("pip install 'lightning-interp[tensorboard]'")):
        make_logger("tensorboard", str(tmp_path), "demo")
    assert {"tensorboard", "tensorboardX"} <= set(asked)
    assert not list(tmp_path.iterdir())
    # Only the tensorboard logger checks; the CSV logger still works.
    assert type(make_logger("csv", str(tmp_path), "demo")).__name__ == "CSVLogger"
