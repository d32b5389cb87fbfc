"""Tuning step 2: a resumable random search around the sweep's learning rate.

Optuna is the engine (``pip install 'lightning-diag[tune]'``). By default the study lives in
``<run_dir>/study.db``, held by one process, so that an interrupted search resumes where it
stopped; any Optuna storage URL (``storage="postgresql://..."``) lets several processes or
machines share one study, with a heartbeat that fails and retries the trial of a worker that
died. A trial may itself train under Lightning's DDP (``strategy="ddp", devices=2``).

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

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from lightning_diag.tuning.records import RefineResult, SearchResult
from lightning_diag.tuning.refine import check_refine_arguments, refine
from lightning_diag.tuning.study import (
    EMBEDDED_STUDY,
    embedded_url,
    fail_leftovers,
    open_storage,
    read_trials,
    require_optuna,
    run_dir_lock,
    trial_sampler,
)
from lightning_diag.tuning.sweep import ModelFactory
from lightning_diag.tuning.trial import TrialSetup, fit_data, fit_trial, handed_trial, objective
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
                           seed: Any, heartbeat: Any = None, diagnose: Any = True,
                           center_lr: Any = 1.0, lr_span: Any = 3.0) -> None:
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
    check_number("center_lr", center_lr, low=0, low_open=True)
    check_number("lr_span", lr_span, low=1, low_open=True)


def _median_pruner(optuna: Any, min_epochs: int) -> Any:
    """Optuna's median pruner, from the end of a trial's ``min_epochs``-th epoch."""
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=min_epochs - 1)


def _finish(optuna: Any, study: Any, run: Any, n_trials: int) -> None:
    """Runs trials until ``study`` holds ``n_trials`` finished ones (complete or pruned), counting
    those of earlier runs and of other workers."""
    states = optuna.trial.TrialState
    finished = (states.COMPLETE, states.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < n_trials:
        study.optimize(run, n_trials=n_trials - done,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished)])


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
    that makes it hopeless beyond doubt (a non-finite loss, an update as large as the weights,
    no weight moving: any FAIL and :data:`~lightning_diag.tuning.pruning.PRUNING_CODES`), often
    at its first step. The finding is kept on the trial (user attribute ``ended_by``), in
    :meth:`SearchResult.table` and in the trial's TensorBoard run.

    Args:
        model_factory: ``model_factory(lr=..., weight_decay=...)`` returns a fresh LightningModule.
        data: A LightningDataModule or a ``(train_loader, val_loader)`` pair.
        center_lr: The sweep's learning rate.
        n_trials: Total finished (complete or pruned) trials wanted in the study.
        storage: Optuna storage URL or object; default ``sqlite:///<run_dir>/study.db``, which
            one process at a time may use (a second is refused with
            :class:`~lightning_diag.tuning.study.RunDirInUseError`; trials left running by a
            killed process are marked failed at the next start). A URL (``sqlite:///...``,
            ``postgresql://...``) is shared by every worker given it.
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
        ImportError: Optuna is not installed. ValueError/TypeError: a bad argument, named;
        :class:`~lightning_diag.tuning.study.StorageError` (a ValueError): a storage URL that
        cannot be opened; :class:`~lightning_diag.tuning.study.RunDirInUseError`: another
        process searches with ``run_dir``'s embedded study.
    """
    optuna = require_optuna()
    check_search_arguments(model_factory=model_factory, n_trials=n_trials, epochs=epochs,
                           weight_decays=weight_decays, study_name=study_name, monitor=monitor,
                           direction=direction, seed=seed, heartbeat=heartbeat,
                           diagnose=diagnose, center_lr=center_lr, lr_span=lr_span)
    lo_ep, hi_ep = _epochs(epochs)
    fit_data(data)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = TrialSetup(model_factory, data, run_dir, monitor, hi_ep, seed, diagnose,
                       dict(trainer_kwargs))
    handed = handed_trial()
    if handed is not None:  # a rank of rank 0's DDP trial: train it, and nothing else after it
        fit_trial(setup, None, handed["number"], handed["lr"], handed["weight_decay"])
        raise SystemExit(0)
    embedded = storage is None
    url = embedded_url(run_dir) if embedded else storage
    with run_dir_lock(run_dir) if embedded else nullcontext():
        study = optuna.create_study(
            storage=open_storage(optuna, url, None if embedded else heartbeat,
                                 embedded=run_dir / EMBEDDED_STUDY if embedded else None),
            study_name=study_name, direction=direction, load_if_exists=True,
            sampler=trial_sampler(optuna, seed), pruner=pruner or _median_pruner(optuna, lo_ep))
        if embedded:  # this process holds the run_dir: RUNNING trials are leftovers of a crash
            fail_leftovers(optuna, study)
        _finish(optuna, study, objective(optuna, setup, center_lr, lr_span, weight_decays),
                n_trials)
        rows = read_trials(study, direction)
    return SearchResult(rows, study.study_name, str(url), monitor, direction, model_factory,
                        data, run_dir, dict(trainer_kwargs))
