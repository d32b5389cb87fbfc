"""A search trial's fixed cost, split by phase, for a trial ended at step 0 and for a full one.

Each trial runs as :func:`~lightning_diag.tuning.random_search` runs it: through the search's
Optuna objective, on one embedded study (its SQLite writes included), with the configuration
enqueued. Four kinds of trial, taking turns ``--repeats`` times after a warm-up of each:

- ``early guided``: ``diagnose=True`` at a learning rate of 10 (AdamW): ended by
  ``update_ratio.too_high`` at step 0;
- ``early plain``: the same configuration without the diagnosis, stopped after one step
  (``max_steps=1``): what a step-0 trial costs without the monitor;
- ``full guided`` / ``full plain``: a learning rate of 1e-3, ``--epochs`` epochs.

Each phase's CPU seconds (``time.process_time``: the load of other jobs does not inflate it,
but on a shared machine it is still noisy) are taken by wrapping the functions that do it:
Optuna's own work for the trial (creating it, sampling, recording it: the whole trial less
the objective), the user attributes written to the study, the model build, the Trainer's
construction, the TensorBoard logger (its construction, its ``SummaryWriter`` and event file,
its ``finalize``), the dataloaders' creation, the callbacks' start and end hooks (``setup``,
``on_fit_start``, ``on_train_start``, ``on_train_end``, ``on_fit_end``, ``teardown``) and
their per-step hooks; "the rest" is the training and validation loops themselves.

    .venv/bin/python benchmarks/bench_trial_cost.py --repeats 10
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_tasks import TASKS

from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule

PHASES = ("optuna", "user attrs", "model build", "Trainer()", "logger", "dataloaders",
          "start/end hooks", "per-step hooks", "the rest")
_ENDS = {"setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown"}
KINDS = {"early guided": (10.0, True), "early plain": (10.0, False),
         "full guided": (1e-3, True), "full plain": (1e-3, False)}


class Clock:
    """CPU seconds spent in wrapped functions, by phase; a phase entered inside another is
    counted for itself, not for the outer one."""

    def __init__(self) -> None:
        self.spent: collections.Counter[str] = collections.Counter()
        self._stack: list[list[Any]] = []  # [name, since]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.process_time()
        if self._stack:  # pause the outer phase
            outer = self._stack[-1]
            self.spent[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.process_time()
            inner = self._stack.pop()
            self.spent[inner[0]] += now - inner[1]
            if self._stack:
                self._stack[-1][1] = now

    def wrap(self, owner: Any, attr: str, name: str | Callable[..., str]) -> None:
        real = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name(*args) if callable(name) else name):
                return real(*args, **kwargs)
        setattr(owner, attr, timed)


def instrument(clock: Clock) -> None:
    import lightning.pytorch.loggers.tensorboard as tb
    import optuna
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from lightning.pytorch.trainer import call
    from torch.utils.tensorboard import SummaryWriter

    import lightning_diag.tuning.trial as trial

    clock.wrap(trial, "build_model", "model build")
    clock.wrap(trial, "quiet_trainer", "Trainer()")
    clock.wrap(tb.TensorBoardLogger, "__init__", "logger")
    clock.wrap(tb.TensorBoardLogger, "finalize", "logger")
    clock.wrap(tb.TensorBoardLogger, "log_hyperparams", "logger")
    clock.wrap(SummaryWriter, "__init__", "logger")
    clock.wrap(SummaryWriter, "close", "logger")
    clock.wrap(_FitLoop, "setup_data", "dataloaders")
    clock.wrap(_EvaluationLoop, "setup_data", "dataloaders")
    clock.wrap(optuna.trial.Trial, "set_user_attr", "user attrs")
    clock.wrap(call, "_call_callback_hooks",
               lambda trainer, hook, *a: "start/end hooks" if hook in _ENDS else "per-step hooks")


def trial_cost(study: Any, run: Any, clock: Clock, lr: float, diagnose: bool) -> dict[str, float]:
    """One trial's CPU seconds by phase."""
    clock.spent.clear()
    study.enqueue_trial({"lr": lr, "weight_decay": 0.0})
    start = time.process_time()
    real_run = run(diagnose)

    inside = [0.0]

    def objective(trial: Any) -> float:
        begin = time.process_time()
        try:
            return real_run(trial)  # type: ignore[no-any-return]
        finally:
            inside[0] = time.process_time() - begin
    study.optimize(objective, n_trials=1, catch=(ValueError,))  # early plain: never validated
    total = time.process_time() - start
    spent = dict(clock.spent)
    named = sum(spent.values())  # all inside the objective but Optuna's
    spent["optuna"] = total - inside[0]
    spent["the rest"] = inside[0] - named
    spent["total"] = total
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bars-cnn-adamw-cosine", choices=["digits", *TASKS])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_diag").setLevel(logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from lightning_diag.tuning.study import embedded_url, open_storage, trial_sampler
    from lightning_diag.tuning.trial import TrialSetup, objective

    clock = Clock()
    instrument(clock)
    if args.task == "digits":  # the library's example, as the families benchmark trains it
        factory: Any = functools.partial(DigitsClassifier, arch="cnn")
        data: Any = DigitsDataModule(batch_size=32, seed=0)
        kwargs: dict[str, Any] = {}
    else:
        factory, data = TASKS[args.task].factory, TASKS[args.task].datamodule(0)
        kwargs = TASKS[args.task].trainer_kwargs()
    costs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        study = optuna.create_study(
            storage=open_storage(optuna, embedded_url(run_dir), None, embedded=run_dir / "s.db"),
            sampler=trial_sampler(optuna, 0), direction="maximize",
            pruner=optuna.pruners.NopPruner())

        def run(diagnose: bool, early: bool) -> Callable[[bool], Any]:
            extra = {"max_steps": 1} if early and not diagnose else {}
            setup = TrialSetup(factory, data, run_dir, "val_acc", args.epochs, 0, diagnose,
                               {**kwargs, "accelerator": "cpu", **extra})
            return lambda d: objective(optuna, setup, 1e-2, 1e4, (0.0,))

        for rep in range(args.repeats + 1):  # the first round warms up, and is not kept
            kinds = list(KINDS) if rep % 2 == 0 else list(reversed(KINDS))
            for kind in kinds:
                lr, diagnose = KINDS[kind]
                cost = trial_cost(study, run(diagnose, kind.startswith("early")), clock, lr,
                                  diagnose)
                if rep:
                    costs[kind].append(cost)
    print(f"{args.task}, {args.epochs} epochs; median CPU ms per trial of {args.repeats} "
          "(interleaved)\n")
    print("| phase | " + " | ".join(KINDS) + " |")
    print("|" + "---|" * (len(KINDS) + 1))
    for phase in (*PHASES, "total"):
        cells = [statistics.median(c.get(phase, 0.0) for c in costs[k]) * 1e3 for k in KINDS]
        print(f"| {phase} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
