"""Drop-in use: the callbacks added to the Lightning code users already have.

Every model here is written in the test (conv, pool, Linear, the user's own names); data comes as plain
dataloaders, iterable datasets and dict batches; every Trainer entry point is exercised with real runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_interp.callbacks import (
    AblationProbeCallback,
    CorrelationOrderCallback,
    FinalLayerSaliencyCallback,
    LogitExpansionCallback,
    PosteriorGapCallback,
)
from lightning_interp.hooks import count_hooks
from lightning_interp.probe import draw_probe, unpack_batch
from lightning_interp.tasks import xie_task

N, SIDE, CLASSES = 192, 10, 3


def _images(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Noise images with a bright pixel on the diagonal at a position given by the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 1, SIDE, SIDE, generator=g)
    x[torch.arange(n), 0, 2 + 3 * y, 2 + 3 * y] += 3.0
    return x, y


def _read(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch.get("image", batch.get("pixels")), batch.get("label", batch.get("digit"))
    return batch[0], batch[1]


class UserCNN(pl.LightningModule):
    """A user's own CNN: two conv blocks named ``body``, global average pooling, a ``head``."""

    def __init__(self, outputs: int = CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(12, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> Tensor:
        x, y = _read(batch)
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = _read(batch)
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, _: int) -> Tensor:
        return self(_read(batch)[0])

    def test_step(self, batch: Any, _: int) -> None:
        x, y = _read(batch)
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), 3e-3)


class LateCNN(UserCNN):
    """Builds its layers in ``configure_model()`` (or, with ``in_setup``, in ``LightningModule.setup()``)."""

    def __init__(self, in_setup: bool = False) -> None:
        pl.LightningModule.__init__(self)
        self.in_setup = in_setup
        self.body: nn.Module | None = None

    def _build(self) -> None:
        if self.body is None:
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(12, CLASSES)

    def configure_model(self) -> None:
        if not self.in_setup:
            self._build()

    def setup(self, stage: str) -> None:
        if self.in_setup:
            self._build()


class CompiledBodyCNN(UserCNN):
    """``self.body = torch.compile(...)``: layer names stay the user's (``body.2``, not ``body._orig_mod.2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(self.body, backend="eager")


def _loaders(n: int = N, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    x, y = _images(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True), DataLoader(
        TensorDataset(*_images(96, seed=1)), batch_size=48
    )


def _trainer(callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def _image_callbacks(**kw: Any) -> list[Any]:
    return [
        FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=3, **kw),
        AblationProbeCallback(layers=["body.3"], probe_size=96, num_steps=40, burn_in=10, **kw),
        CorrelationOrderCallback(layers=["body.3"], probe_size=96, **kw),
    ]


class _FirstStep(Callback):
    """Records whether every watched callback was ready (validated) before the first training step."""

    def __init__(self, watched: list[Any]) -> None:
        self.watched, self.ready = watched, None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.ready is None:
            self.ready = [cb.prepared(trainer.lightning_module) for cb in self.watched]


# ------------------------------------------------------------------------------------------ 1. probe data
def test_plain_dataloaders_to_fit_probe_from_the_validation_loader() -> None:
    cbs = _image_callbacks()
    first = _FirstStep(cbs)
    trainer = _trainer([*cbs, first], max_epochs=2)
    train, val = _loaders()
    trainer.fit(UserCNN(), train, val)
    assert first.ready == [True, True, True], "prepared before the first training step"
    for cb in cbs:
        assert cb.history and cb.history[-1]["step"] == 2 * len(train), "measured the trained weights at the end"
        assert cb.probe_source(trainer)[1] == "the validation dataloader"
    # the probe is drawn from the validation set, by index, with the callback's own generator
    val_x = val.dataset.tensors[0]
    drawn = cbs[2].probe_inputs
    assert len(drawn) == 96 and all(any(torch.equal(d, v) for v in val_x) for d in drawn[:8])


def test_training_loader_only_is_read_at_train_start_before_step_one() -> None:
    cbs = _image_callbacks()
    first = _FirstStep(cbs)
    trainer = _trainer([*cbs, first])
    train, _ = _loaders()
    trainer.fit(UserCNN(), train)
    assert first.ready == [True, True, True]
    assert all(cb.probe_source(trainer)[1] == "the training dataloader" and cb.history for cb in cbs)


def test_explicit_probe_takes_precedence_in_every_accepted_form() -> None:
    x, y = _images(40, seed=3)
    forms = {
        "tensor": x,
        "pair": (x, y),
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=7),
    }
    train, val = _loaders()
    for name, probe in forms.items():
        cb = CorrelationOrderCallback(layers=["body.1"], probe_size=30, min_per_class=2, probe=probe)
        if name == "tensor":  # unlabelled: correlation orders need labels, and say how to give them
            with pytest.raises(ValueError, match="needs labelled probe data"):
                _trainer([cb]).fit(UserCNN(), train, val)
            continue
        trainer = _trainer([cb])
        trainer.fit(UserCNN(), train, val)
        assert cb.probe_source(trainer)[1] == "the probe argument", name
        rows = [next(i for i in range(40) if torch.equal(x[i], d)) for d in cb.probe_inputs]
        assert len(set(rows)) == 30 and torch.equal(cb.probe_labels, y[rows]), name


class _Stream(IterableDataset):
    """An iterable dataset (a stream: no length, no indexing) of (image, label) items."""

    def __init__(self, n: int = 96, seed: int = 1) -> None:
        self.x, self.y = _images(n, seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from zip(self.x, self.y, strict=True)


def test_iterable_validation_loader_gives_its_first_items_whatever_the_seed() -> None:
    train, _ = _loaders()
    stream = _Stream()
    histories = []
    for seed in (0, 1):
        cb = AblationProbeCallback(layers=["body.1"], probe_size=64, seed=seed)  # 8 units: exact, seed-free
        pl.seed_everything(0, verbose=False)  # the same model and training: only the callback's seed differs
        _trainer([cb]).fit(UserCNN(), train, DataLoader(stream, batch_size=24))
        assert torch.equal(cb.probe_inputs, stream.x[:64]) and torch.equal(cb.probe_labels, stream.y[:64])
        histories.append(cb.history)
    assert histories[0][-1]["body.1/full_accuracy"] == pytest.approx(histories[1][-1]["body.1/full_accuracy"])
    # a map-style loader is sampled by index: another seed draws another probe
    other = [AblationProbeCallback(layers=["body.1"], probe_size=64, seed=s) for s in (0, 1)]
    for cb in other:
        _trainer([cb]).fit(UserCNN(), train, DataLoader(TensorDataset(stream.x, stream.y), batch_size=24))
    assert not torch.equal(other[0].probe_inputs, other[1].probe_inputs)


def test_probe_size_larger_than_the_data_warns_once_with_the_numbers() -> None:
    train, val = _loaders()
    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=500, every_n_epochs=1)
    with pytest.warns(UserWarning, match=r"probe_size=500 but the validation dataloader has only 96 items") as record:
        _trainer([cb], max_epochs=2).fit(UserCNN(), train, val)
    assert sum("probe_size=500" in str(w.message) for w in record) == 1
    assert len(cb.probe_inputs) == 96


class _DictImages(Dataset):
    def __init__(self, keys: tuple[str, str] = ("image", "label"), n: int = N, seed: int = 0) -> None:
        self.x, self.y = _images(n, seed)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i], "path": f"img_{i}.png"}


def test_dict_batches_default_keys_explicit_keys_and_a_callable() -> None:
    trainer_kw: dict[str, Any] = {}
    train = DataLoader(_DictImages(), batch_size=32)
    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=64)
    _trainer([cb], **trainer_kw).fit(UserCNN(), train)
    rows = [next(i for i in range(N) if torch.equal(train.dataset.x[i], d)) for d in cb.probe_inputs]
    assert cb.history and torch.equal(cb.probe_labels, train.dataset.y[rows])

    odd = DataLoader(_DictImages(keys=("pixels", "digit")), batch_size=32)
    bad = CorrelationOrderCallback(layers=["body.3"], probe_size=64)
    with pytest.raises(TypeError, match=r"keys \['pixels', 'digit', 'path'\].*unpack=\('image', 'label'\)"):
        _trainer([bad]).fit(UserCNN(), odd)
    for unpack in (("pixels", "digit"), lambda b: (b["pixels"], b["digit"])):
        good = CorrelationOrderCallback(layers=["body.3"], probe_size=64, unpack=unpack)
        _trainer([good]).fit(UserCNN(), odd)
        assert good.history and good.probe_labels is not None


def test_unpack_batch_shapes() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    meta = {"id": ["a", "b", "c", "d"]}
    assert unpack_batch(x)[1] is None
    for batch in ((x, y), [x, y], (x, y, meta), {"inputs": x, "targets": y}, {"x": x, "y": y.float()}):
        got_x, got_y = unpack_batch(batch)
        assert torch.equal(got_x, x) and torch.equal(got_y, y) and got_y.dtype == torch.int64
    assert unpack_batch((x, torch.randn(4, 2)))[1] is None  # not class indices: no labels
    assert torch.equal(unpack_batch({"a": y, "b": x}, unpack=("b", "a"))[1], y)
    assert torch.equal(unpack_batch((meta, x, y), unpack=(1, 2))[0], x)
    with pytest.raises(TypeError, match="unpack="):
        unpack_batch({"a": x})
    with pytest.raises(TypeError, match=r"unpack=\('z', 'y'\) does not fit the batch"):
        unpack_batch({"x": x, "y": y}, unpack=("z", "y"))
    probe = draw_probe(_Stream(10), 32, torch.Generator())
    assert probe.available == 10 and not probe.deterministic and len(probe.inputs) == 10


# ------------------------------------------------------------------------------------------ 2. any module
@pytest.mark.parametrize("in_setup", [False, True], ids=["configure_model", "module_setup"])
def test_models_built_late_are_checked_once_they_exist(in_setup: bool) -> None:
    cbs = _image_callbacks()
    train, val = _loaders()
    _trainer(cbs).fit(LateCNN(in_setup=in_setup), train, val)
    assert all(cb.history for cb in cbs)
    bad = AblationProbeCallback(layers=["body.9"])
    with pytest.raises(ValueError, match=r"unknown layer 'body\.9'.*'body\.3'"):
        _trainer([bad]).fit(LateCNN(in_setup=in_setup), train, val)


def test_compiled_submodule_uses_the_users_layer_names_and_measures_like_eager() -> None:
    train, val = _loaders()
    cbs = _image_callbacks(every_n_epochs=1)
    model = CompiledBodyCNN()
    trainer = _trainer(cbs, max_epochs=2)
    trainer.fit(model, train, val)
    assert all(len(cb.history) == 2 for cb in cbs)
    assert cbs[0].saliency.feature_layer in ("body", "body.3") and cbs[0].saliency.classifier == "head"
    # the same weights without compilation measure the same numbers (same probe, same step, same seeds)
    eager = UserCNN()
    eager.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()})
    before = count_hooks(model)
    for cb in cbs:
        compiled_run = {k: float(v) for k, v in cb.run(trainer, model).scalars.items()}
        eager_run = {k: float(v) for k, v in cb.run(trainer, eager).scalars.items()}
        assert compiled_run.keys() == eager_run.keys()
        for k in compiled_run:
            assert compiled_run[k] == pytest.approx(eager_run[k], rel=1e-5, abs=1e-6, nan_ok=True), (type(cb).__name__, k)
    assert count_hooks(model) == before
    assert isinstance(model.body, torch._dynamo.eval_frame.OptimizedModule), "the compiled wrapper is put back"


def test_compiled_model_handed_to_the_trainer() -> None:
    train, val = _loaders()
    cbs = _image_callbacks()
    _trainer(cbs).fit(torch.compile(UserCNN(), backend="eager"), train, val)
    assert all(cb.history for cb in cbs)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["saliency", "ablation", "correlation"])
def test_single_logit_binary_output_is_refused_before_the_first_step(which: int) -> None:
    train, val = _loaders()
    cb = _image_callbacks()[which]
    first = _FirstStep([cb])
    with pytest.raises(ValueError, match=r"single logit per example \(\[N, 1\]\).*torch\.cat\(\[-z / 2, z / 2\]"):
        _trainer([cb, first]).fit(UserCNN(outputs=1), train, val)
    assert first.ready is None


# ------------------------------------------------------------------------------------------ 3. entry points
def _all_callbacks() -> list[Any]:
    return [
        *_image_callbacks(),
        PosteriorGapCallback(task=xie_task(1), probe_size=64),
        LogitExpansionCallback(seq_len=4, num_states=2, num_samples=16),
    ]


def test_test_and_predict_leave_every_callback_idle() -> None:
    train, val = _loaders()
    model = UserCNN()
    _trainer([]).fit(model, train, val)
    cbs = _all_callbacks()  # posterior gap and expansion would fail their checks on this model: idle, they don't run
    hooks = count_hooks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nor warn
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        out = _trainer(cbs).predict(model, val)
        _trainer(cbs).test(model, val)
    assert len(out) == 2 and out[0].shape == (48, CLASSES)
    assert all(cb.history == [] for cb in cbs) and count_hooks(model) == hooks


def test_validate_with_ckpt_path_measures_once_on_the_restored_weights(tmp_path: Any) -> None:
    train, val = _loaders()
    fit_cbs = _image_callbacks(every_n_epochs=1)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    pl.seed_everything(0, verbose=False)
    _trainer([*fit_cbs, ckpt], max_epochs=2, enable_checkpointing=True).fit(UserCNN(), train, val)

    audit_cbs = _image_callbacks(every_n_epochs=1)  # the fit's configuration: the checkpoint holds their state
    results = _trainer(audit_cbs).validate(UserCNN(), val, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert "val_loss" in results[0]
    for fitted, audited in zip(fit_cbs, audit_cbs, strict=True):
        # the checkpoint holds the fit's history (same configuration); validate() measures the weights of its
        # last step again, which replaces that entry (one entry per step)
        assert [h["step"] for h in audited.history] == [h["step"] for h in fitted.history]
        # a fresh (random) model was restored from the checkpoint: the numbers are those of the trained
        # weights, labelled with the checkpoint's step
        assert audited.history[-1].keys() == fitted.history[-1].keys()
        for k, v in fitted.history[-1].items():
            if k != "epoch":
                assert audited.history[-1][k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k
    # a callback whose state the checkpoint does not hold measures once too
    other = CorrelationOrderCallback(layers=["body.3"], probe_size=96, seed=5)
    _trainer([other]).validate(UserCNN(), val, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert [h["step"] for h in other.history] == [2.0 * len(train)]


def test_resume_from_a_checkpoint_without_the_callbacks_state_fakes_no_start(tmp_path: Any) -> None:
    train, val = _loaders()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _trainer([ckpt], max_epochs=1, enable_checkpointing=True).fit(UserCNN(), train, val)
    steps_per_epoch = len(train)
    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=96, measure_at_start=True, every_n_epochs=1)
    _trainer([cb], max_epochs=3).fit(UserCNN(), train, val, ckpt_path=str(tmp_path / "last.ckpt"))
    assert [h["step"] for h in cb.history] == [2.0 * steps_per_epoch, 3.0 * steps_per_epoch]
    fresh = CorrelationOrderCallback(layers=["body.3"], probe_size=96, measure_at_start=True, every_n_epochs=1)
    _trainer([fresh], max_epochs=1).fit(UserCNN(), train, val)
    assert [h["step"] for h in fresh.history] == [0.0, 1.0 * steps_per_epoch], "a fresh fit does measure at start"


# ------------------------------------------------------------------------------------------ 4. metrics
def test_early_stopping_and_model_checkpoint_monitor_callback_metrics(tmp_path: Any) -> None:
    task = xie_task(1)
    x, y = task.sample(256, torch.Generator().manual_seed(0))
    x2, y2 = task.sample(64, torch.Generator().manual_seed(1))
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x2, y2), batch_size=64)

    class Tiny(UserCNN):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    gap = PosteriorGapCallback(task=task, probe_size=128, log_images=False, prog_bar=["kl"])
    corr = CorrelationOrderCallback(layers=["net.1"], probe_size=64, log_images=False)
    # a threshold every value meets: EarlyStopping stops after the first epoch's check, on our metric
    stop = EarlyStopping(monitor="posterior_gap/kl", stopping_threshold=1e9)
    best = ModelCheckpoint(dirpath=str(tmp_path), monitor="correlation/net.1/higher_order_gap", mode="min", save_top_k=1)
    trainer = _trainer([gap, corr, stop, best], max_epochs=5, enable_checkpointing=True)
    trainer.fit(Tiny(), train, val)
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0, "stopped on posterior_gap/kl after epoch 0"
    assert float(trainer.callback_metrics["posterior_gap/kl"]) == pytest.approx(gap.history[-1]["kl"])
    for k, v in corr.history[-1].items():
        if k not in ("step", "epoch"):
            assert float(trainer.callback_metrics[f"correlation/{k}"]) == pytest.approx(v, rel=1e-6)
    assert float(best.best_model_score) == pytest.approx(corr.history[0]["net.1/higher_order_gap"], rel=1e-6)
    bar = trainer.progress_bar_metrics
    assert "posterior_gap/kl" in bar and "posterior_gap/tv" not in bar and "correlation/net.1/acc_real" not in bar


# ------------------------------------------------------------------------------------------ ddp
class _RankStream(_Stream):
    """A stream sharded by rank, as streaming datasets are: every rank sees other items."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        yield from zip(self.x[rank::2], self.y[rank::2], strict=True)


class _DumpHistory(Callback):
    def __init__(self, watched: Any, path: str) -> None:
        self.watched, self.path = watched, path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            {"history": self.watched.history, "probe": self.watched.probe_inputs}, f"{self.path}/rank{trainer.global_rank}.pt"
        )


def test_ddp_plain_loaders_and_a_sharded_stream_measure_the_same_probe_on_every_rank(tmp_path: Any) -> None:
    train, _ = _loaders()
    stream = _RankStream(96)
    cb = AblationProbeCallback(layers=["body.1"], probe_size=32)
    trainer = _trainer([cb, _DumpHistory(cb, str(tmp_path))], devices=2, strategy="ddp_spawn")
    trainer.fit(UserCNN(), train, DataLoader(stream, batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["probe"], ranks[1]["probe"]), "rank 0's stream items, broadcast"
    assert torch.equal(ranks[0]["probe"], stream.x[0::2][:32])
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert h0 and len(h0) == len(h1)
    for a, b in zip(h0, h1, strict=True):  # the same numbers on every rank (NaN where a read-out is undefined)
        assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# ------------------------------------------------------------------------------------------ 5. arguments
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FinalLayerSaliencyCallback(probe_size=0), ValueError, r"probe_size must be an int >= 1, got 0"),
        (lambda: FinalLayerSaliencyCallback(deletion_steps=-1), ValueError, r"deletion_steps must be an int >= 0"),
        (lambda: FinalLayerSaliencyCallback(target="labels"), ValueError, r"target must be one of 'predicted', 'label'"),
        (lambda: FinalLayerSaliencyCallback(feature_layer=3), TypeError, r"feature_layer must be a named_modules\(\) path"),
        (lambda: AblationProbeCallback(layers=[]), ValueError, r"layers must name at least one layer"),
        (lambda: AblationProbeCallback(layers="x", prior_keep=1.0), ValueError, r"prior_keep must be a number in \(0, 1\)"),
        (lambda: AblationProbeCallback(layers="x", num_chains=0), ValueError, r"num_chains must be an int >= 1, got 0"),
        (lambda: AblationProbeCallback(layers="x", method="gibbs"), ValueError, r"method must be one of 'auto', 'exact'"),
        (lambda: AblationProbeCallback(layers="x", tasks=[1, 1]), ValueError, r"distinct class indices"),
        (lambda: CorrelationOrderCallback(layers=[]), ValueError, r"layers must be 'auto' or a list"),
        (lambda: CorrelationOrderCallback(min_per_class=1), ValueError, r"min_per_class must be an int >= 2, got 1"),
        (lambda: PosteriorGapCallback(grid_size=1), ValueError, r"grid_size must be an int >= 2, got 1"),
        (lambda: LogitExpansionCallback(seq_len=4, num_states=2, target=(1, 1)), ValueError, r"pair \(a, b\) of distinct"),
        (lambda: LogitExpansionCallback(seq_len=4, num_states=2, method="exact", max_evaluations=8), ValueError, r"q\^L = 16"),
        (lambda: CorrelationOrderCallback(seed=-1), ValueError, r"seed must be an int >= 0, got -1"),
        (lambda: CorrelationOrderCallback(every_n_epochs=True), ValueError, r"every_n_epochs must be None or an int"),
        (lambda: CorrelationOrderCallback(unpack="image"), TypeError, r"unpack must be \(input_key, label_key\)"),
        (lambda: CorrelationOrderCallback(prog_bar="kl"), TypeError, r"prog_bar must be a list of scalar names"),
        (lambda: CorrelationOrderCallback(log_images="yes"), TypeError, r"log_images must be True or False"),
    ],
)
def test_arguments_are_checked_in_init(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------------------------------ review findings
def test_a_callback_reused_for_another_fit_measures_that_fit() -> None:
    train, val = _loaders()
    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=64, measure_at_start=True)
    for _ in range(2):  # a sweep reusing its callbacks list
        _trainer([cb]).fit(UserCNN(), train, val)
        assert [h["step"] for h in cb.history] == [0.0, float(len(train))]


class _NumpyJitter(Dataset):
    """Augments with NumPy's and Python's global RNGs, as many user datasets do."""

    def __init__(self) -> None:
        self.x, self.y = _images()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        import random

        import numpy as np

        shift = float(np.random.normal()) + random.random()
        return self.x[i] + 0.1 * shift, self.y[i]


def test_probe_draws_leave_numpy_and_python_random_states_alone() -> None:
    def fit(callbacks: list[Callback]) -> dict[str, Tensor]:
        pl.seed_everything(3, verbose=False)
        model = UserCNN()
        _trainer(callbacks, max_epochs=2).fit(model, DataLoader(_NumpyJitter(), batch_size=32, shuffle=True))
        return model.state_dict()

    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=64, measure_at_start=True)
    with_cb, without = fit([cb]), fit([])
    assert len(cb.history) == 3
    assert all(torch.equal(with_cb[k], without[k]) for k in without)


def test_loader_collate_with_a_batch_sampler_and_sampler_splits_are_respected() -> None:
    from torch.utils.data import BatchSampler, SequentialSampler, SubsetRandomSampler

    x, y = _images()

    def to_dict(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        return {"image": torch.stack([a for a, _ in items]), "label": torch.stack([b for _, b in items])}

    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 16, False), collate_fn=to_dict)
    probe = draw_probe(loader, 20, torch.Generator())
    assert probe.inputs.shape == (20, 1, SIDE, SIDE) and probe.labels is not None
    # one dataset, two samplers: the validation probe stays inside the validation indices
    val = DataLoader(data, sampler=SubsetRandomSampler(range(150, N)), batch_size=16)
    probe = draw_probe(val, 100, torch.Generator())
    rows = {next(i for i in range(N) if torch.equal(x[i], d)) for d in probe.inputs}
    assert probe.available == N - 150 and rows == set(range(150, N))
    # ready-made batches from a stream (DataLoader(batch_size=None)) are read batch by batch
    batches = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 150, 50)]
    probe = draw_probe(DataLoader(batches, batch_size=None), 120, torch.Generator())
    assert torch.equal(probe.inputs, x[:120]) and torch.equal(probe.labels, y[:120])
    # a list [inputs, labels] of arrays is a pair
    probe = draw_probe([x.numpy(), y.numpy()], 10, torch.Generator())
    assert probe.inputs.shape == (10, 1, SIDE, SIDE) and probe.labels.shape == (10,)


def test_monitored_metrics_are_measured_at_every_epoch_the_monitor_checks(tmp_path: Any) -> None:
    train, val = _loaders()
    every2 = CorrelationOrderCallback(layers=["body.3"], probe_size=64, every_n_epochs=2, measure_at_end=False)
    stop = EarlyStopping(monitor="correlation/body.3/acc_real", mode="max", patience=10)
    _trainer([stop, every2], max_epochs=3).fit(UserCNN(), train, val)  # the monitor listed first
    assert [h["epoch"] for h in every2.history] == [0.0, 1.0, 2.0], "the monitor's epochs, not the cadence's"
    assert stop.wait_count >= 0 and stop.best_score.isfinite()

    class Seen(Callback):
        def __init__(self) -> None:
            self.values: list[Any] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.values.append(trainer.callback_metrics.get("correlation/body.3/acc_real"))

    # without a monitor the cadence holds, and a metric is present only in the epochs that measured it
    every2 = CorrelationOrderCallback(layers=["body.3"], probe_size=64, every_n_epochs=2, measure_at_end=False)
    seen = Seen()
    _trainer([every2, seen], max_epochs=4).fit(UserCNN(), train, val)
    assert [v is None for v in seen.values] == [True, False, True, False], "present only in epochs that measured"
    every2_ckpt = ModelCheckpoint(dirpath=str(tmp_path), monitor="correlation/body.3/acc_real", mode="max", every_n_epochs=2)
    cb = CorrelationOrderCallback(layers=["body.3"], probe_size=64, every_n_epochs=2)
    _trainer([cb, every2_ckpt], max_epochs=2, enable_checkpointing=True).fit(UserCNN(), train, val)
    assert every2_ckpt.best_model_score is not None


def test_clear_errors_for_wrong_probe_shapes_and_unknown_label_keys() -> None:
    train, val = _loaders()
    rgb = FinalLayerSaliencyCallback(probe=torch.randn(8, 3, SIDE, SIDE))
    with pytest.raises(TypeError, match=r"UserCNN failed on the probe inputs of shape \[3, 10, 10\]"):
        _trainer([rgb]).fit(UserCNN(), train, val)
    ragged = CorrelationOrderCallback(probe=[torch.randn(3, 4), torch.randn(5, 4), torch.randn(2), torch.randn(1)], probe_size=4)
    with pytest.raises(TypeError, match=r"could not read probe data from the probe argument"):
        _trainer([ragged]).fit(UserCNN(), train, val)
    digits = DataLoader(_DictImages(keys=("image", "digit")), batch_size=32)
    cb = AblationProbeCallback(layers=["body.3"])
    with pytest.raises(ValueError, match=r"needs labelled probe data.*unpack=\('image', 'digit'\)"):
        _trainer([cb]).fit(UserCNN(), digits)


def test_figures_are_rendered_only_when_something_takes_them(tmp_path: Any) -> None:
    train, val = _loaders()

    class Counting(CorrelationOrderCallback):
        calls = 0

        def figures(self, measurement: Any) -> dict[str, Any]:
            type(self).calls += 1
            return super().figures(measurement)

    _trainer([Counting(layers=["body.3"], probe_size=64)], max_epochs=2).fit(UserCNN(), train, val)  # logger=False
    assert Counting.calls == 0
    cb = Counting(layers=["body.3"], probe_size=64, figure_dir=str(tmp_path))
    _trainer([cb], max_epochs=2).fit(UserCNN(), train, val)
    assert Counting.calls == len(cb.history) == 2 and len(list(tmp_path.glob("*.png"))) == 2
