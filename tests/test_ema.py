"""EMAWeights: reference maths, swaps, checkpoints, resume, faults, and the EMA loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.functional.ema import all_finite, ema_update_, warmup_decay
from lightning_diag.inference.checkpoints import CheckpointLoadError
from lightning_diag.inference.ema import load_ema_weights
from lightning_diag.tensorboard.tags import EMA_RUN, VALIDATION_RUN, ema_comparison
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _model(net: Any = cnn, lr: float = 0.05, opt: str = "sgd", dropout: float = 0.0) -> Classifier:
    pl.seed_everything(0)
    return Classifier(net(dropout=dropout), lr=lr, optimizer=opt)


def _fit(tmp_path: Path, model: Classifier, callbacks: list[pl.Callback], n: int = 128,
         shuffle: bool = True, **kw: Any) -> pl.Trainer:
    kw.setdefault("max_steps", 4)
    t = trainer(tmp_path, callbacks, deterministic=True, **kw)
    ds = digits(n)
    t.fit(model, loader(ds, 32, shuffle=shuffle), loader(ds, 64, shuffle=False))
    return t


class Recorder(pl.Callback):
    """Snapshots of the weights after every optimizer step (and at fit start)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


# --- maths -----------------------------------------------------------------------------------
def test_update_matches_direct_expression() -> None:
    torch.manual_seed(0)
    ema, new = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    expected = [0.9 * e + 0.1 * w for e, w in zip(ema, new, strict=True)]
    ema_update_(ema, new, 0.9)
    for got, want in zip(ema, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_warmup_formula_and_finite_check() -> None:
    assert warmup_decay(0.999, 0, True) == pytest.approx(0.1)
    assert warmup_decay(0.999, 8, True) == pytest.approx(0.5)
    assert warmup_decay(0.5, 1000, True) == 0.5
    assert warmup_decay(0.999, 0, False) == 0.999
    assert all_finite([torch.ones(3), torch.zeros(2)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf")])])


@pytest.mark.parametrize("kw", [{"decay": 1.0}, {"decay": -0.1}, {"evaluate": "best"},
                                {"update_every_n_steps": 0}, {"start_step": -1}, {"warmup": 1}])
def test_arguments_validated(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        EMAWeights(**kw)


# --- training --------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,every,start", [(True, 1, 0), (False, 2, 1)])
def test_ema_equals_hand_computed_reference(tmp_path: Path, warmup: bool, every: int,
                                            start: int) -> None:
    rec, ema = Recorder(), EMAWeights(decay=0.8, warmup=warmup, update_every_n_steps=every,
                                      start_step=start, evaluate="raw")
    _fit(tmp_path, _model(), [rec, ema], n=192, max_steps=5)
    assert len(rec.states) == 6
    ref = {k: v.clone() for k, v in rec.states[0].items()}
    n = 0
    for step, state in enumerate(rec.states[1:]):
        if step < start or (step - start) % every:
            continue
        d = 0.0 if (n == 0 and start > 0) else (min(0.8, (1 + n) / (10 + n)) if warmup else 0.8)
        for k, w in state.items():
            ref[k] = d * ref[k] + (1 - d) * w if w.is_floating_point() else w.clone()
        n += 1
    assert ema.num_updates == n
    got = ema.ema_state_dict()
    assert list(got) == list(rec.states[0])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    tracked = [k for k in got if k.endswith("num_batches_tracked")]
    assert tracked and all(got[k].dtype == torch.long and int(got[k]) > 0 for k in tracked)
    assert not codes(ema.findings, "warn") and len(ema.hooks) == 0


def test_defaults_give_the_average_of_a_plain_torch_reference_bit_for_bit(tmp_path: Path) -> None:
    """At its defaults (decay 0.999 with warm-up, every step) the average is, bit for bit,
    each step's ``torch.lerp`` of the last one towards the weights (what the fused update
    computes tensor by tensor), integer buffers copied."""
    rec, ema = Recorder(), EMAWeights(evaluate="raw")
    _fit(tmp_path, _model(), [rec, ema], n=192, max_steps=6)
    ref = {k: v.clone() for k, v in rec.states[0].items()}
    for n, state in enumerate(rec.states[1:]):
        d = min(0.999, (1.0 + n) / (10.0 + n))
        ref = {k: torch.lerp(ref[k], w, 1.0 - d) if w.is_floating_point() else w.clone()
               for k, w in state.items()}
    got = ema.ema_state_dict()
    assert ema.num_updates == 6 and list(got) == list(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


class SwapProbe(pl.Callback):
    """Placed before EMAWeights: raw weights at validation start must come back at its end."""

    def __init__(self, ema: EMAWeights) -> None:
        self.ema, self.checked = ema, 0
        self.raw: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, *a: Any) -> None:
        expected = self.ema.ema_state_dict() if self.ema.num_updates else self.raw
        assert all(torch.equal(v, expected[k]) for k, v in pl_module.state_dict().items())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert all(torch.equal(v, self.raw[k]) for k, v in pl_module.state_dict().items())
        self.checked += 1


def test_validation_swap_restores_raw_weights_bit_identically(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.9)
    probe = SwapProbe(ema)
    _fit(tmp_path, _model(), [probe, ema], max_steps=8, val_check_interval=2,
         num_sanity_val_steps=1)
    assert probe.checked >= 3  # the sanity check (raw: no update yet) + validations with EMA


class StorageProbe(pl.Callback):
    """Placed after EMAWeights: while swapped, the module's tensors ARE the average's (no copy)."""

    def __init__(self, ema: EMAWeights) -> None:
        self.ema, self.steps = ema, set[int]()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, *a: Any) -> None:
        if self.ema.num_updates:
            avg = self.ema._built().state()
            assert all(v.data_ptr() == avg[k].data_ptr()
                       for k, v in pl_module.state_dict().items())
            self.steps.add(trainer.global_step)


def test_validation_swap_trades_storage_and_optimizer_keeps_the_raw_weights(
        tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.9)
    probe = StorageProbe(ema)
    model = _model(opt="adam")
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    t = _fit(tmp_path, model, [ema, probe], max_steps=6, val_check_interval=2)
    assert probe.steps == {2, 4}  # both validations (max_steps ends the fit before a third)
    opt = t.optimizers[0]
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(params) and all(a is b for a, b in zip(held, params, strict=True))
    assert [p.data_ptr() for p in params] == ptrs  # the raw storage, trained in place
    assert all(p in opt.state and opt.state[p]["exp_avg"].shape == p.shape for p in params)


@pytest.mark.parametrize("evaluate", ["raw", "both", "ema"])
def test_main_run_weights_unchanged(tmp_path: Path, evaluate: str) -> None:
    plain = _fit(tmp_path / "a", _model(opt="adam", dropout=0.2), [], max_steps=6,
                 val_check_interval=3).lightning_module.state_dict()
    ema = EMAWeights(decay=0.9, evaluate=evaluate)
    with_ema = _fit(tmp_path / "b", _model(opt="adam", dropout=0.2), [ema], max_steps=6,
                    val_check_interval=3).lightning_module.state_dict()
    assert all(torch.equal(plain[k], with_ema[k]) for k in plain)


def test_both_logs_ema_metrics(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.5, evaluate="both")
    t = _fit(tmp_path, _model(), [ema], n=100, max_steps=6)  # val batches of 64 and 36
    m = t.callback_metrics
    assert {"val_loss", "val_acc", "val_loss_ema", "val_acc_ema"} <= set(m)
    model = t.lightning_module
    model.eval()
    with ema.swapped(model), torch.no_grad():
        x, y = digits(100).tensors
        want = torch.nn.functional.cross_entropy(model(x), y)
    assert float(m["val_loss_ema"]) == pytest.approx(float(want), rel=1e-5)
    assert float(m["val_loss_ema"]) != pytest.approx(float(m["val_loss"]), rel=1e-6)
    run = tmp_path / "tb" / "version_0"
    assert "val_acc_ema" in events(run).Tags()["scalars"]
    # the trained weights (the validation run, as the curves') and EMA of each metric on one
    # chart: one tag, two sibling runs, step = epoch
    for sibling, key in ((VALIDATION_RUN, "val_loss"), (EMA_RUN, "val_loss_ema")):
        (*_, last) = events(run / sibling).Scalars(ema_comparison("val_loss"))
        assert last.step == t.current_epoch - 1 or last.step == t.current_epoch
        assert last.value == pytest.approx(float(m[key]), rel=1e-6)


def test_resume_restores_ema_exactly(tmp_path: Path) -> None:
    full = EMAWeights(decay=0.7)
    _fit(tmp_path / "full", _model(), [full], shuffle=False, max_steps=-1, max_epochs=2,
         limit_train_batches=2, limit_val_batches=1)
    first = EMAWeights(decay=0.7)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "first", _model(), [first, ckpt], shuffle=False, max_steps=-1, max_epochs=1,
         limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    path = next((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)["callbacks"][first.state_key]

    class AtStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.ema = resumed.ema_state_dict()

    resumed, probe = EMAWeights(decay=0.7), AtStart()
    t = trainer(tmp_path / "resume", [resumed, probe], deterministic=True, max_epochs=2,
                limit_train_batches=2, limit_val_batches=1)
    ds = digits(128)
    t.fit(_model(), loader(ds, 32, shuffle=False), loader(ds, 64, shuffle=False),
          ckpt_path=str(path))
    assert all(torch.equal(probe.ema[k], v) for k, v in saved["ema"].items())
    assert resumed.num_updates == full.num_updates == 4
    a, b = full.ema_state_dict(), resumed.ema_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class NaNAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, opt: Any) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.fill_(float("nan"))


def test_non_finite_weights_skip_update(tmp_path: Path) -> None:
    # The loss stays finite at step 2 (only the gradient is poisoned): the opt-in weight check
    # is what keeps the average clean.
    rec = Recorder()
    ema = EMAWeights(decay=0.5, warmup=False, evaluate="raw", check_weights=True)
    _fit(tmp_path, _model(mlp), [NaNAtStep(2), rec, ema], n=192, max_steps=5, limit_val_batches=0)
    assert ema.num_updates == 2 and ema.num_skipped == 3
    assert codes(ema.findings, "warn") == {"ema.non_finite"}
    got = ema.ema_state_dict()
    assert all(torch.isfinite(v).all() for v in got.values())
    ref = {k: 0.25 * v + 0.25 * rec.states[1][k] + 0.5 * rec.states[2][k]
           for k, v in rec.states[0].items()}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def test_checkpoint_saved_while_swapped_holds_raw_weights(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.5)
    t = _fit(tmp_path, _model(), [ema], max_steps=3)
    model = t.lightning_module
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model):
        t.save_checkpoint(tmp_path / "mid.ckpt")
        assert not all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    ck = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert all(torch.equal(ck["state_dict"][k], raw[k]) for k in raw)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    # and the EMA loader puts the average into a fresh model
    fresh = load_ema_weights(Classifier(cnn(dropout=0.0)), tmp_path / "mid.ckpt")
    avg = ema.ema_state_dict()
    assert all(torch.equal(v, avg[k]) for k, v in fresh.state_dict().items())


def test_no_swap_leaks_into_validate_after_fit(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.5)
    t = _fit(tmp_path, _model(), [ema], max_steps=3)
    model = t.lightning_module
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[bool] = []

    class Look(pl.Callback):
        def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, *a: Any) -> None:
            seen.append(all(torch.equal(v, raw[k]) for k, v in pl_module.state_dict().items()))

    t.callbacks.append(Look())  # type: ignore[attr-defined]
    t.validate(model, loader(digits(64), 64, shuffle=False), verbose=False)
    assert seen == [True]
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_load_ema_weights_errors(tmp_path: Path) -> None:
    t = _fit(tmp_path, _model(), [EMAWeights(decay=0.5)], max_steps=2)
    t.save_checkpoint(tmp_path / "ok.ckpt")
    with pytest.raises(CheckpointLoadError, match="missing keys.*unexpected keys") as err:
        load_ema_weights(Classifier(mlp()), tmp_path / "ok.ckpt")
    assert "ok.ckpt" in str(err.value) and err.value.missing and err.value.unexpected
    plain = _fit(tmp_path / "p", _model(), [], max_steps=1)
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointLoadError, match="no EMA state"):
        load_ema_weights(Classifier(cnn()), tmp_path / "plain.ckpt")


def test_sharded_strategy_rejected_at_setup() -> None:
    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(ValueError, match="FSDPStrategy"):
        EMAWeights().setup(FakeTrainer(), _model(), "fit")  # type: ignore[arg-type]


def test_swapped_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        with EMAWeights().swapped(_model()):
            pass


def test_bf16_weights_are_averaged_in_float32(tmp_path: Path) -> None:
    rec, ema = Recorder(), EMAWeights(decay=0.5, warmup=False, evaluate="raw", device="cpu")
    _fit(tmp_path, _model(mlp), [rec, ema], max_steps=2, precision="bf16-true",
         limit_val_batches=0)
    got = ema.ema_state_dict()
    assert {v.dtype for v in got.values()} == {torch.float32}
    for k, v in rec.states[0].items():
        want = 0.25 * v.float() + 0.25 * rec.states[1][k].float() + 0.5 * rec.states[2][k].float()
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)


def test_second_fit_starts_a_new_average(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.5, evaluate="raw")
    _fit(tmp_path / "a", _model(), [ema], max_steps=2)
    _fit(tmp_path / "b", _model(), [ema], max_steps=3)
    assert ema.num_updates == 3


def test_a_second_fit_starts_a_new_average(tmp_path: Path) -> None:
    """State of one fit is reset at the next (a restored checkpoint aside): a reused callback
    averages only the second fit's weights, as a fresh one would."""
    reused = EMAWeights(decay=0.9, evaluate="raw")
    _fit(tmp_path / "a", _model(), [reused], max_steps=3)
    _fit(tmp_path / "b", _model(lr=0.1), [reused], max_steps=2)
    fresh = EMAWeights(decay=0.9, evaluate="raw")
    _fit(tmp_path / "c", _model(lr=0.1), [fresh], max_steps=2)
    assert reused.num_updates == fresh.num_updates == 2
    assert all(torch.equal(reused.ema_state_dict()[k], v)
               for k, v in fresh.ema_state_dict().items())
    assert [f.code for f in reused.findings] == [f.code for f in fresh.findings]


def _ema_sum(cb: Any) -> float:
    return sum(float(t.double().sum()) for t in cb.ema_state_dict().values()
               if t.is_floating_point())


SHARED = Shared(
    EMAWeights,
    run={"decay": 0.9, "evaluate": "both"},
    guard={"decay": 0.9, "evaluate": "ema"},  # swaps its average in for validation
    bad=[("decay", 1.0, V), ("decay", -0.1, V), ("decay", True, T), ("warmup", 1, T),
         ("update_every_n_steps", 0, V), ("update_every_n_steps", True, T),
         ("start_step", -1, V), ("device", "gpu", V), ("device", 0, T),
         ("evaluate", "best", V), ("evaluate", None, T), ("check_weights", "no", T),
         ("strict", 1, T)],
    # without warm-up: with it, the first updates of both use the same ramped decay
    state=(lambda d: (EMAWeights(decay=0.5, warmup=False),
                      EMAWeights(decay=0.9, warmup=False, evaluate="raw")),
           _ema_sum, None),
)
