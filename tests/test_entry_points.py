"""The opt-in `lightning.pytorch.callbacks_factory` entry point."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_interp.callbacks import AblationProbeCallback, FinalLayerSaliencyCallback, PosteriorGapCallback


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
