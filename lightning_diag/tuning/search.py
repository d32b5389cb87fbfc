"""Tuning steps 2-3: a resumable random search around the sweep's learning rate, then refinement.

Optuna is the engine (``pip install 'lightning-diag[tune]'``). By default the study lives in
``<run_dir>/study.db`` so that an interrupted search resumes where it stopped; any Optuna storage
URL (``storage="postgresql://..."``) lets several processes or machines share one study, with a
heartbeat that fails and retries the trial of a worker that died. A trial may itself train under
Lightning's DDP (``strategy="ddp", devices=2``).

Example:
    >>> from functools import partial
    >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
    >>> from lightning_diag.tuning import random_search, refine
    >>> found = random_search(partial(DigitsClassifier, arch="mlp"), DigitsDataModule(),
    ...                       center_lr=1e-2, n_trials=4, epochs=(1, 2),
    ...                       run_dir="runs/tune")  # doctest: +SKIP
    >>> print(refine(found, top_k=2, epochs=10).table())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.findings import Finding, Severity
from lightning_diag.tensorboard.writer import markdown_table
from lightning_diag.tuning.pruning import DiagnosisPruning, describe_end, trial_monitors
from lightning_diag.tuning.sweep import ModelFactory, build_model, quiet_trainer
from lightning_diag.validation import (
    check_callable,
    check_choice,
    check_flag,
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
)

__all__ = ["RefineResult", "SearchResult", "check_refine_arguments", "check_search_arguments",
           "random_search", "refine", "require_optuna"]


def require_optuna() -> Any:
    """Import Optuna or explain how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise ImportError("The random search needs Optuna: pip install 'lightning-diag[tune]'.") \
            from err
    return optuna


def _fit_data(data: Any) -> dict[str, Any]:
    """``Trainer.fit`` keyword arguments for a datamodule or a ``(train, val)`` loader pair."""
    if isinstance(data, pl.LightningDataModule):
        return {"datamodule": data}
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return {"train_dataloaders": data[0], "val_dataloaders": data[1]}
    raise TypeError("`data` must be a LightningDataModule or a (train_loader, val_loader) pair, "
                    f"got {type(data).__name__}.")


def _trial_sampler(optuna: Any, seed: int) -> Any:
    """A random sampler whose draws depend on ``(seed, trial.number, name)`` only.

    Optuna's ``RandomSampler(seed)`` replays the same sequence in every process and after every
    restart, so workers sharing a study, or a resumed search, would repeat configurations; trial
    numbers are unique within a study, hence so are these draws.
    """
    dists = optuna.distributions

    class TrialSeededSampler(optuna.samplers.BaseSampler):  # type: ignore[misc,name-defined]
        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            rng = np.random.default_rng([seed, trial.number, zlib.crc32(name.encode())])
            if isinstance(dist, dists.CategoricalDistribution):
                return dist.choices[int(rng.integers(len(dist.choices)))]
            if isinstance(dist, dists.IntDistribution):
                return int(rng.integers(dist.low, dist.high + 1))
            if dist.log:
                return float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
            return float(rng.uniform(dist.low, dist.high))

    return TrialSeededSampler()


class _Pruning(pl.Callback):
    """Reports ``monitor`` after each validation and stops the fit when Optuna says prune.

    Under DDP only rank 0 holds the trial (``trial`` is None on the others): its decision is
    broadcast, so that every rank stops at the same epoch.
    """

    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.curve: list[float] = []
        self.pruned = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.curve.append(float(value))
        prune = False
        if self.trial is not None:
            self.trial.report(float(value), step=trainer.current_epoch)
            prune = bool(self.trial.should_prune())
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned = True
            trainer.should_stop = True


# Lightning's DDP launcher runs the user's script again for every other rank, and it does so at
# each fit: rank 0 names the trial it trains in this variable, which the new ranks inherit.
_HANDED_TRIAL = "LIGHTNING_DIAG_TRIAL"


def _handed_trial() -> dict[str, Any] | None:
    """The trial rank 0 trains, in a process Lightning's DDP launcher started for another rank."""
    handed = os.environ.get(_HANDED_TRIAL)
    if handed is None or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return None
    return dict(json.loads(handed))


# what Lightning's launcher writes into rank 0's environment; left there, the next fit would
# take rank 0 for a process started by someone else and launch no other rank
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _handing(trial: dict[str, Any]) -> Iterator[None]:
    """Hand ``trial`` to the ranks a DDP fit launches; afterwards let the next trial launch its own
    (Lightning keeps the process group until the process exits, and marks the environment)."""
    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    was_distributed = _distributed()
    os.environ[_HANDED_TRIAL] = json.dumps(trial)
    try:
        yield
    finally:
        del os.environ[_HANDED_TRIAL]
        if not was_distributed and _distributed():
            torch.distributed.destroy_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass
class SearchResult:
    """A finished (or resumed) search: every trial, best first, and what is needed to refine.

    Attributes:
        rows: One dict per finished trial (number, lr, weight_decay, value, state, epochs,
            steps, seconds, worker, ended_by, ended_at, why), best first. ``ended_by`` is the
            code of the finding that ended a trial the diagnosis pruned (``ended_at`` its step,
            ``why`` its sentence), ``"pruner"`` for one Optuna's pruner stopped, else ``""``.
        study_name, storage: Where the study lives.
        monitor, direction: The objective.
    """

    rows: list[dict[str, Any]]
    study_name: str
    storage: str
    monitor: str
    direction: str
    model_factory: ModelFactory = field(repr=False)
    data: Any = field(repr=False)
    run_dir: Path = field(repr=False)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        """Every trial, best first, then one line per trial the diagnosis ended saying why."""
        table = markdown_table(
            ["trial", "lr", "weight decay", self.monitor, "state", "epochs", "steps", "ended by"],
            [[str(r["number"]), f"{r['lr']:.3e}", f"{r['weight_decay']:g}",
              f"{r['value']:.4f}" if math.isfinite(r["value"]) else "-", str(r["state"]),
              str(r["epochs"]), str(r["steps"]), _ended(r)] for r in self.rows])
        why = [f"- trial {r['number']}: {r['why']}" for r in sorted(self.rows,
               key=lambda r: r["number"]) if r["why"]]
        if not why:
            return table
        return "\n\n".join([table, "Trials the diagnosis ended:", "\n".join(why)])


def _ended(row: dict[str, Any]) -> str:
    """The "ended by" cell: the finding's code and step, the median pruner, or nothing."""
    if row["ended_by"] == "pruner":
        return f"Optuna's pruner (epoch {row['epochs']})"
    if row["ended_by"]:
        return f"{row['ended_by']} (step {row['ended_at']})"
    return ""


def _epochs(epochs: Any) -> tuple[int, int]:
    """``(min, max)`` epochs of a trial from an int or a pair, checked."""
    if not isinstance(epochs, Sequence):
        check_int("epochs", epochs)
        return epochs, epochs
    check_sequence("epochs", epochs, check_int, min_len=2, max_len=2)
    require(epochs[0] <= epochs[1], "epochs", epochs, "a (min, max) pair with min <= max")
    return epochs[0], epochs[1]


def check_search_arguments(*, model_factory: Any, n_trials: Any, epochs: Any,
                           weight_decays: Any, study_name: Any, monitor: Any, direction: Any,
                           seed: Any, heartbeat: Any = None, diagnose: Any = True) -> None:
    """Check the arguments :func:`random_search` shares with ``tune``, before any training.

    Example:
        >>> check_search_arguments(model_factory=dict, n_trials=4, epochs=(1, 5),
        ...                        weight_decays=(1e-4, 0.0), study_name="s", monitor="val_acc",
        ...                        direction="max", seed=0)
        Traceback (most recent call last):
        ...
        ValueError: `direction` must be one of 'maximize', 'minimize', got 'max'.
    """
    check_callable("model_factory", model_factory)
    check_int("n_trials", n_trials)
    _epochs(epochs)
    check_sequence("weight_decays", weight_decays, partial(check_number, low=0))
    check_str("study_name", study_name)
    check_str("monitor", monitor)
    check_choice("direction", direction, ("maximize", "minimize"))
    check_int("seed", seed, low=None)
    check_int("heartbeat", heartbeat, optional=True)
    check_flag("diagnose", diagnose)


def check_refine_arguments(*, top_k: Any, epochs: Any, seed: Any) -> None:
    """Check the arguments of :func:`refine`, before any training."""
    check_int("top_k", top_k)
    check_int("epochs", epochs)
    check_int("seed", seed, low=None)


def random_search(model_factory: ModelFactory, data: Any, center_lr: float, n_trials: int,
                  epochs: int | tuple[int, int] = (1, 5),
                  weight_decays: Sequence[float] = (1e-4, 1e-5, 0.0), storage: Any = None,
                  study_name: str = "lightning_diag_search", run_dir: str | Path = "tune_runs",
                  monitor: str = "val_acc", direction: str = "maximize", lr_span: float = 3.0,
                  seed: int = 0, pruner: Any = None, heartbeat: int | None = 60,
                  diagnose: bool = True, **trainer_kwargs: Any) -> SearchResult:
    """Random search of learning rate and weight decay, ``n_trials`` in total across resumes.

    The learning rate is log-uniform in ``[center_lr / lr_span, center_lr * lr_span]``, the weight
    decay drawn from ``weight_decays``. Each trial trains up to ``epochs[1]`` epochs; after
    ``epochs[0]`` epochs, Optuna's ``MedianPruner`` (or ``pruner``) may stop a trial whose
    ``monitor`` is worse than the median of earlier trials at the same epoch. With ``diagnose``
    (the default), each trial also trains with :func:`~lightning_diag.tuning.pruning.
    trial_monitors` and ends, pruned, after the first step where one of them reports a finding
    that makes it hopeless (a non-finite or stalled loss, an update as large as the weights or
    none at all, vanishing or exploding gradients: any FAIL and
    :data:`~lightning_diag.tuning.pruning.PRUNING_CODES`), often at its first step. The
    finding is kept on the trial (user attribute ``ended_by``), in :meth:`SearchResult.table`
    and in the trial's TensorBoard run.

    Args:
        model_factory: ``model_factory(lr=..., weight_decay=...)`` returns a fresh LightningModule.
        data: A LightningDataModule or a ``(train_loader, val_loader)`` pair.
        center_lr: The sweep's learning rate.
        n_trials: Total finished (complete or pruned) trials wanted in the study.
        storage: Optuna storage URL or object; default ``sqlite:///<run_dir>/study.db`` (one
            process per run dir: trials left running by a killed process are marked failed at
            the next start). A URL (``postgresql://...``) is shared by every worker given it.
        study_name: The study's name in the storage.
        run_dir: TensorBoard logs of each trial (``search/trial_<n>``) and the default study.
        monitor, direction: Metric logged by the model and ``"maximize"`` or ``"minimize"``.
        seed: Trial ``n`` draws its values from ``(seed, n)``, so workers never repeat each other.
        heartbeat: With a storage URL, a running trial writes a heartbeat every ``heartbeat``
            seconds; one silent for twice that (its worker died) is marked failed by the next
            worker to start a trial and run once more with the same values. None: no heartbeat.
        diagnose: End hopeless trials by what the monitors see (see above); False: the
            validation metric alone prunes.
        **trainer_kwargs: Passed to ``pl.Trainer``. ``strategy="ddp", devices=2`` trains each
            trial on two processes: Lightning runs the script again for rank 1, whose
            ``random_search`` trains rank 0's trial and then ends that process (one search per
            script; log ``monitor`` with ``sync_dist=True``).

    Raises:
        ImportError: Optuna is not installed. ValueError/TypeError: a bad argument, named.
    """
    optuna = require_optuna()
    check_number("center_lr", center_lr, low=0, low_open=True)
    check_search_arguments(model_factory=model_factory, n_trials=n_trials, epochs=epochs,
                           weight_decays=weight_decays, study_name=study_name, monitor=monitor,
                           direction=direction, seed=seed, heartbeat=heartbeat,
                           diagnose=diagnose)
    check_number("lr_span", lr_span, low=1, low_open=True)
    lo_ep, hi_ep = _epochs(epochs)
    _fit_data(data)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def fit_trial(trial: Any, number: int, lr: float, wd: float
                  ) -> tuple[_Pruning, Finding | None, pl.Trainer]:
        """Train one trial; also return the finding that ended it, if the diagnosis did."""
        monitors = trial_monitors() if diagnose else []
        diagnosis = [DiagnosisPruning(monitors)] if diagnose else []
        pruning = _Pruning(trial, monitor)
        logger = TensorBoardLogger(str(run_dir), name="search", version=f"trial_{number}")
        trainer = quiet_trainer(max_epochs=hi_ep, logger=logger,
                                callbacks=[*monitors, *diagnosis, pruning], **trainer_kwargs)
        with _handing({"number": number, "lr": lr, "weight_decay": wd}):
            trainer.fit(build_model(model_factory, lr, wd, seed), **_fit_data(data))
        return pruning, next((d.ended_by for d in diagnosis), None), trainer

    handed = _handed_trial()
    if handed is not None:  # a rank of rank 0's DDP trial: train it, and nothing else after it
        fit_trial(None, handed["number"], handed["lr"], handed["weight_decay"])
        raise SystemExit(0)
    embedded = storage is None
    storage = storage if storage is not None else f"sqlite:///{(run_dir / 'study.db').resolve()}"
    url = storage
    if isinstance(storage, str) and not embedded and heartbeat is not None:
        storage = _heartbeat_storage(optuna, storage, heartbeat)
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction=direction, load_if_exists=True,
        sampler=_trial_sampler(optuna, seed),
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2,
                                                     n_warmup_steps=lo_ep - 1))
    states = optuna.trial.TrialState
    if embedded:  # one process per embedded study: RUNNING trials are leftovers of a crash
        for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            study.tell(t.number, state=states.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    if done < n_trials:
        def objective(trial: Any) -> float:
            lr = trial.suggest_float("lr", center_lr / lr_span, center_lr * lr_span, log=True)
            wd = trial.suggest_categorical("weight_decay", [float(w) for w in weight_decays])
            trial.set_user_attr("worker", os.getpid())
            pruning, ended, trainer = fit_trial(trial, trial.number, lr, wd)
            trial.set_user_attr("curve", pruning.curve)
            trial.set_user_attr("steps", trainer.global_step)
            if ended is not None:
                why = describe_end(ended)
                trial.set_user_attr("ended_by", {
                    "code": ended.code, "severity": ended.severity.name, "step": ended.step,
                    "check": ended.check, "why": why})
                raise optuna.TrialPruned(why)
            if pruning.pruned:
                trial.set_user_attr("ended_by", {"code": "pruner"})
                raise optuna.TrialPruned()
            if not pruning.curve:
                raise ValueError(f"`{monitor}` was never logged after validation; logged: "
                                 f"{sorted(trainer.callback_metrics)}.")
            return pruning.curve[-1]

        finished = optuna.study.MaxTrialsCallback(n_trials, states=(states.COMPLETE, states.PRUNED))
        study.optimize(objective, n_trials=n_trials - done, callbacks=[finished])
    return _result(study, url, monitor, direction, model_factory, data, run_dir, trainer_kwargs)


def _heartbeat_storage(optuna: Any, url: str, heartbeat: int) -> Any:
    """The RDB storage at ``url`` with heartbeats; a stale trial is failed, then retried once."""
    with warnings.catch_warnings():  # the retry callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat,
                                      failed_trial_callback=retry)


def _result(study: Any, storage: Any, monitor: str, direction: str, model_factory: ModelFactory,
            data: Any, run_dir: Path, trainer_kwargs: dict[str, Any]) -> SearchResult:
    rows = []
    for t in study.get_trials(deepcopy=False):
        curve = t.user_attrs.get("curve", [])
        value = t.value if t.value is not None else (curve[-1] if curve else math.nan)
        if t.state.name in ("COMPLETE", "PRUNED"):
            ended = t.user_attrs.get("ended_by") or {}
            took = (t.datetime_complete - t.datetime_start).total_seconds() \
                if t.datetime_complete and t.datetime_start else math.nan
            rows.append({"number": t.number, "lr": t.params["lr"],
                         "weight_decay": t.params["weight_decay"], "value": float(value),
                         "state": t.state.name.lower(), "epochs": len(curve), "curve": curve,
                         "steps": t.user_attrs.get("steps", 0), "seconds": took,
                         "worker": t.user_attrs.get("worker"),
                         "ended_by": ended.get("code", ""), "ended_at": ended.get("step"),
                         "why": ended.get("why", "")})
    sign = -1.0 if direction == "maximize" else 1.0
    rows.sort(key=lambda r: (r["state"] != "complete", sign * r["value"]
                             if math.isfinite(r["value"]) else math.inf))
    return SearchResult(rows, study.study_name, str(storage), monitor, direction, model_factory,
                        data, run_dir, dict(trainer_kwargs))


@dataclass
class RefineResult:
    """The best configurations trained longer, ranked, with the advisor's reading of each run."""

    rows: list[dict[str, Any]]
    monitor: str

    def table(self) -> str:
        """The ranked configurations, then :meth:`next_step`."""
        return markdown_table(
            ["rank", "lr", "weight decay", self.monitor, "advisor"],
            [[str(r["rank"]), f"{r['lr']:.3e}", f"{r['weight_decay']:g}", f"{r['value']:.4f}",
              ", ".join(r["advisor"]) or "healthy"] for r in self.rows]
        ) + f"\n\n{self.next_step()}"

    def next_step(self) -> str:
        """One sentence: the configuration to train longer, or what to change in it (recipe
        6.4, read from the advisor's verdicts on the best run; step 5: back to step 3).

        Example:
            >>> RefineResult([{"rank": 1, "lr": 3e-3, "weight_decay": 1e-4, "value": 0.97,
            ...                "advisor": ["advisor.overfit"]}], "val_acc").next_step()[:81]
            'Next: configuration 1 (lr 3.00e-03, weight decay 0.0001, val_acc 0.9700) overfits'
        """
        if not self.rows:
            return "Next: nothing was refined."
        best = self.rows[0]
        name = (f"configuration {best['rank']} (lr {best['lr']:.2e}, weight decay "
                f"{best['weight_decay']:g}, {self.monitor} {best['value']:.4f})")
        said = set(best["advisor"])
        what = next((text for code, text in _NEXT if code in said), None)
        if what is not None:
            return f"Next: {name} {what}."
        others = ", ".join(sorted(said))
        if others:
            return f"Next: look at {name}'s findings ({others}) before training it longer."
        return (f"Next: train {name} longer: the advisor saw no plateau, under- or overfitting "
                "in its run (recipe step 6.5: back to step 3 with more epochs).")


#: What the best refined run's verdict says to do, the most pressing first.
_NEXT = (
    ("advisor.divergence", "diverged: lower its learning rate (about 10x) before training it "
                           "longer"),
    ("advisor.overfit", "overfits: raise its weight decay or add other regularization (or get "
                        "more data), then refine it again"),
    ("advisor.underfit", "underfits: use a bigger model or train it longer"),
    ("advisor.plateau", "plateaus while its loss is still high: decay its learning rate (x0.1) "
                        "and train on"),
)


def refine(results: SearchResult, top_k: int = 3, epochs: int = 10, seed: int = 0,
           advisor: dict[str, Any] | None = None, **trainer_kwargs: Any) -> RefineResult:
    """Train the ``top_k`` best completed configurations for ``epochs`` (recipe: 10-20) with no
    learning-rate decay and an :class:`LRPlateauAdvisor` attached (``advisor`` = its kwargs).

    The factory's model must not decay its learning rate (a scheduler triggers a warning).
    Logs go to ``<run_dir>/refine/config_<rank>``.
    """
    check_refine_arguments(top_k=top_k, epochs=epochs, seed=seed)
    best = [r for r in results.rows if r["state"] == "complete"][:top_k]
    if not best:
        raise ValueError("The search has no completed trial to refine.")
    rows = []
    for i, cfg in enumerate(best):
        adv = LRPlateauAdvisor(**(advisor or {}))
        logger = TensorBoardLogger(str(results.run_dir), name="refine", version=f"config_{i}")
        trainer = quiet_trainer(max_epochs=epochs, logger=logger, callbacks=[adv],
                                **{**results.trainer_kwargs, **trainer_kwargs})
        trainer.fit(build_model(results.model_factory, cfg["lr"], cfg["weight_decay"], seed),
                    **_fit_data(results.data))
        if trainer.lr_scheduler_configs:
            warnings.warn("refine: the model decays its learning rate; the recipe's step 3 trains "
                          "without decay so that the advisor can choose one.", stacklevel=2)
        value = trainer.callback_metrics.get(results.monitor)
        rows.append({"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], "trial": cfg["number"],
                     "value": float(value) if value is not None else math.nan,
                     "advisor": sorted({f.code for f in adv.findings
                                        if f.severity >= Severity.WARN}),
                     # the verdicts; the info saying which metric names it reads is no reading
                     "reading": [f.format() for f in adv.findings
                                 if f.severity >= Severity.WARN],
                     "curve": list(adv.history.get(results.monitor, []))})
    sign = -1.0 if results.direction == "maximize" else 1.0
    rows.sort(key=lambda r: sign * r["value"] if math.isfinite(r["value"]) else math.inf)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return RefineResult(rows, results.monitor)
