"""``lightning-diag tune``: sweep -> search -> refine on the digits demo or on your own classes.

Example:
    >>> import argparse
    >>> from lightning_diag.tuning.cli import add_tune_arguments
    >>> parser = argparse.ArgumentParser()
    >>> add_tune_arguments(parser)
    >>> parser.parse_args([]).model
    'lightning_diag.examples.digits:DigitsClassifier'
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
from typing import Any

__all__ = ["add_tune_arguments", "load_class", "run_tune"]

DEFAULT_MODEL = "lightning_diag.examples.digits:DigitsClassifier"


def load_class(spec: str) -> Any:
    """Import ``package.module:Class``.

    Raises:
        ValueError: ``spec`` is not of that form, or the module or class is missing.
    """
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"Expected `package.module:Class`, got {spec!r}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} from {spec!r}: {err}") from err
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Module {module_name!r} has no attribute {name!r} ({spec!r}).")
        obj = getattr(obj, part)
    return obj


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` options; the defaults finish in a couple of minutes on 2 CPU cores."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="LightningModule class as package.module:Class; its __init__ must "
                             "accept `lr` and `weight_decay`.")
    parser.add_argument("--model-kwargs", default=None,
                        help="JSON dict of other constructor arguments of the model (default "
                             "for the demo model: '{\"arch\": \"mlp\"}', else '{}').")
    parser.add_argument("--datamodule", default="lightning_diag.examples.digits:DigitsDataModule",
                        help="LightningDataModule class as package.module:Class.")
    parser.add_argument("--datamodule-kwargs", default="{}",
                        help="JSON dict of the datamodule's constructor arguments.")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4],
                        help="Learning rates of the sweep (recipe default).")
    parser.add_argument("--sweep-steps", type=int, default=50,
                        help="Iterations per learning rate in the sweep (recipe: 100).")
    parser.add_argument("--trials", type=int, default=4, help="Random-search trials in total.")
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 2], metavar=("MIN", "MAX"),
                        help="Epochs per trial: at most MAX, prunable after MIN (recipe: 1 5).")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[1e-4, 1e-5, 0.0])
    parser.add_argument("--top-k", type=int, default=2, help="Configurations refined.")
    parser.add_argument("--refine-epochs", type=int, default=4,
                        help="Epochs of each refined run (recipe: 10-20).")
    parser.add_argument("--monitor", default="val_acc", help="Validation metric to optimize.")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    parser.add_argument("--run-dir", default="tune_runs",
                        help="Charts, TensorBoard runs and the embedded study (study.db).")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL shared by several workers (default: embedded).")
    parser.add_argument("--heartbeat", type=int, default=60,
                        help="Seconds between heartbeats of a trial in a --storage URL: a trial "
                             "silent for twice that is failed and retried once (0: off).")
    parser.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                        help="Prune search trials on the validation metric only, not also on "
                             "what the monitors see (a non-finite or stalled loss, updates as "
                             "large as the weights or none at all, vanishing gradients).")
    parser.add_argument("--study-name", default="lightning_diag_search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")


def run_tune(args: argparse.Namespace) -> int:
    """Run ``tune`` from parsed arguments; print the summary. Returns the exit status: 0, or 2
    with one line on stderr for a usage error (a bad number, class, JSON or storage URL, a
    run directory another search holds), before any training."""
    from lightning_diag.tuning.pipeline import check_tune_arguments, tune
    from lightning_diag.tuning.study import RunDirInUseError, StorageError, require_optuna

    try:
        require_optuna()  # before the sweep, not after it
        model_cls = load_class(args.model)
        dm_cls = load_class(args.datamodule)
        default_kwargs = '{"arch": "mlp"}' if args.model == DEFAULT_MODEL else "{}"
        model_kwargs = json.loads(args.model_kwargs or default_kwargs)
        dm_kwargs = json.loads(args.datamodule_kwargs)
        if not isinstance(model_kwargs, dict) or not isinstance(dm_kwargs, dict):
            raise ValueError("--model-kwargs and --datamodule-kwargs must be JSON objects.")

        def factory(lr: float, weight_decay: float) -> Any:
            return model_cls(lr=lr, weight_decay=weight_decay, **model_kwargs)

        kwargs: dict[str, Any] = dict(
            lrs=tuple(args.lrs), sweep_steps=args.sweep_steps, n_trials=args.trials,
            epochs=(args.epochs[0], args.epochs[1]), weight_decays=tuple(args.weight_decays),
            top_k=args.top_k, refine_epochs=args.refine_epochs, study_name=args.study_name,
            monitor=args.monitor, direction=args.direction, seed=args.seed,
            heartbeat=args.heartbeat or None, diagnose=args.diagnose)
        check_tune_arguments(model_factory=factory, **kwargs)
    except (ImportError, ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        return _usage_error(err)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        tune(factory, dm_cls(**dm_kwargs), run_dir=args.run_dir, storage=args.storage,
             verbose=True, accelerator=args.accelerator, **kwargs)
    except (StorageError, RunDirInUseError) as err:  # raised before any training
        return _usage_error(err)
    return 0


def _usage_error(err: BaseException) -> int:
    """One line naming the mistake by its command-line option; exit status 2."""
    text = re.sub(r"`(\w+)(\[\d+\])?`",
                  lambda m: f"`{_OPTIONS.get(m[1], m[1])}`" + (f" (value {int(m[2][1:-1]) + 1})"
                                                             if m[2] else ""),
                  " ".join(str(err).split()))
    print(f"lightning-diag tune: {text}", file=sys.stderr)
    return 2


#: The arguments of ``tune`` the checks name, and the options that set them.
_OPTIONS = {"lrs": "--lrs", "sweep_steps": "--sweep-steps", "n_trials": "--trials",
            "epochs": "--epochs", "weight_decays": "--weight-decays", "top_k": "--top-k",
            "refine_epochs": "--refine-epochs", "study_name": "--study-name",
            "monitor": "--monitor", "heartbeat": "--heartbeat", "seed": "--seed"}
