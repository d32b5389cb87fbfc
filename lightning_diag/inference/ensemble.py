"""Ensembles for inference (recipe step 7): average several models' predictions.

Example:
    >>> import torch
    >>> from lightning_diag.inference.ensemble import EnsembleModel
    >>> members = [torch.nn.Linear(4, 3) for _ in range(3)]
    >>> ensemble = EnsembleModel(members).eval()
    >>> with torch.inference_mode():
    ...     probs = ensemble(torch.randn(2, 4))
    >>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(2)))
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_diag.batch import default_batch_to_input, default_batch_to_target
from lightning_diag.functional.ensemble import COMBINE, combine_logits, ensemble_log_probs
from lightning_diag.inference.checkpoints import (
    PathLike,
    check_state_dict,
    load_checkpoint,
    module_from_checkpoint,
    state_dict_of,
)

__all__ = ["EnsembleModel", "evaluate_members", "train_ensemble", "train_top_configs"]


class EnsembleModel(nn.Module):
    """An ``nn.Module`` whose forward combines its members' logits.

    Args:
        models: The members; each maps the same input to ``(N, C)`` logits.
        combine: ``"mean_prob"`` (mean of softmax probabilities; the output is probabilities),
            ``"mean_logit"`` (mean of logits) or ``"vote"`` (fraction of members per class).
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "mean_prob") -> None:
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("`models` must be a non-empty sequence of nn.Module, got "
                             f"{[type(m).__name__ for m in models]}.")
        if combine not in COMBINE:
            raise ValueError(f"`combine` must be one of {COMBINE}, got {combine!r}.")
        self.members = nn.ModuleList(models)
        self.combine = combine

    def member_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The members' outputs stacked as ``(K, N, C)``."""
        return torch.stack([m(*args, **kwargs) for m in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return combine_logits(self.member_logits(*args, **kwargs), self.combine)

    @classmethod
    def from_checkpoints(cls, module_class: type[nn.Module], paths: Sequence[PathLike],
                         map_location: str | torch.device = "cpu", combine: str = "mean_prob",
                         trust: bool = False, **kwargs: Any) -> EnsembleModel:
        """Build one member per checkpoint, in eval mode on ``map_location``.

        Every file is read safely (``weights_only=True`` onto the CPU) and every member's keys
        and shapes are checked before any weights are loaded. Each member is
        ``module_class(**hyper_parameters)`` from its checkpoint, overridden by ``kwargs``.

        Raises:
            CheckpointLoadError: naming the file: missing, empty, truncated, not a checkpoint,
                needs pickled globals, or not matching the architecture.
        """
        if isinstance(paths, (str, bytes)) or not paths:
            raise ValueError(f"`paths` must be a non-empty list of checkpoint paths, got "
                             f"{paths!r}.")
        pending = []
        for path in paths:
            ckpt = load_checkpoint(path, trust=trust)
            module = module_from_checkpoint(module_class, ckpt, path, **kwargs)
            state = state_dict_of(ckpt, path)
            check_state_dict(module, state, path)
            pending.append((module, state))
        for module, state in pending:
            module.load_state_dict(state)
        return cls([m.to(map_location) for m, _ in pending], combine=combine).eval()


@torch.no_grad()
def evaluate_members(models: Sequence[nn.Module], batches: Iterable[Any],
                     combine: str = "mean_prob", device: torch.device | str = "cpu"
                     ) -> dict[str, Any]:
    """Loss and accuracy of each member and of their ensemble over ``(input, target)`` batches.

    Returns:
        ``{"members": [{"loss", "acc"}, ...], "ensemble": {"loss", "acc"}}``; the ensemble's loss
        is the NLL of its combined probabilities.
    """
    ensemble = EnsembleModel(models, combine)
    n, loss, correct = 0, torch.zeros(len(models) + 1), torch.zeros(len(models) + 1)
    for batch in batches:
        batch = move_data_to_device(batch, device)
        x, y = default_batch_to_input(batch), default_batch_to_target(batch)
        logits = ensemble.member_logits(x).float()
        logp = ensemble_log_probs(combine_logits(logits, combine), combine)
        for i, out in enumerate([*logits.log_softmax(-1), logp]):
            loss[i] += F.nll_loss(out, y, reduction="sum").cpu()
            correct[i] += (out.argmax(-1) == y).sum().cpu()
        n += len(y)
    if n == 0:
        raise ValueError("evaluate_members: the batches were empty.")
    rows = [{"loss": float(loss[i] / n), "acc": float(correct[i] / n)} for i in range(len(loss))]
    return {"members": rows[:-1], "ensemble": rows[-1]}


def _fit_one(model: pl.LightningModule, data: Any, trainer_kwargs: Mapping[str, Any]) -> None:
    opts = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, **trainer_kwargs}
    trainer = pl.Trainer(**opts)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data)
    elif isinstance(data, (tuple, list)):
        trainer.fit(model, *data)
    else:
        trainer.fit(model, data)


def train_ensemble(model_factory: Callable[[], pl.LightningModule], data: Any,
                   seeds: Sequence[int] = (0, 1, 2), combine: str = "mean_prob",
                   **trainer_kwargs: Any) -> EnsembleModel:
    """Train the same model from different random initializations (recipe step 7.1).

    Args:
        model_factory: Builds a fresh model; called after ``seed_everything(seed)``.
        data: A LightningDataModule, a train DataLoader, or ``(train_loader, val_loader)``.
        seeds: One member per seed.
        trainer_kwargs: Passed to each ``pl.Trainer`` (default: no logger, no checkpoints).

    Example:
        >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
        >>> ens = train_ensemble(lambda: DigitsClassifier(arch="mlp"), DigitsDataModule(),
        ...                      seeds=(0, 1), max_epochs=1)  # doctest: +SKIP
    """
    if not seeds:
        raise ValueError(f"`seeds` must be a non-empty sequence of ints, got {seeds!r}.")
    models = []
    for seed in seeds:
        pl.seed_everything(int(seed), workers=True, verbose=False)
        model = model_factory()
        _fit_one(model, data, trainer_kwargs)
        models.append(model)
    return EnsembleModel(models, combine).eval()


def train_top_configs(model_factory: Callable[..., pl.LightningModule],
                      configs: Sequence[Mapping[str, Any]], data: Any, k: int = 3, seed: int = 0,
                      combine: str = "mean_prob", **trainer_kwargs: Any) -> EnsembleModel:
    """One model per top configuration from tuning (recipe step 7.2).

    Args:
        model_factory: Called as ``model_factory(**config)``.
        configs: Hyperparameter dicts, best first (e.g. the tuner's top trials' params).
        data: As in :func:`train_ensemble`.
        k: Use the first ``k`` configurations.
        seed: Seed used before building each member.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    if not configs or not all(isinstance(c, Mapping) for c in configs):
        raise ValueError("`configs` must be a non-empty list of hyperparameter dicts, got "
                         f"{configs!r}.")
    models = []
    for config in list(configs)[:k]:
        pl.seed_everything(seed, workers=True, verbose=False)
        model = model_factory(**config)
        _fit_one(model, data, trainer_kwargs)
        models.append(model)
    return EnsembleModel(models, combine).eval()
