"""Ensembles for inference (recipe step 7): average several models' predictions, for any task.

:class:`EnsembleModel` calls every member with the same arguments and combines their
predictions (:func:`~lightning_diag.functional.ensemble.combine_outputs`): the mean of the class
probabilities for classification scores, handed back in the members' kind of scores (logits in,
log of the mean probability out), the mean of the outputs for regression.
:func:`evaluate_members` compares the ensemble with each member on the metrics the members' own
``validation_step`` logs.

Example:
    >>> import torch
    >>> from lightning_diag.inference.ensemble import EnsembleModel
    >>> members = [torch.nn.Linear(4, 3) for _ in range(3)]
    >>> ensemble = EnsembleModel(members).eval()
    >>> with torch.inference_mode():
    ...     out = ensemble(torch.randn(2, 4))  # logits in: log of the mean probability out
    >>> out.shape, bool(torch.allclose(out.exp().sum(1), torch.ones(2)))
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_diag.batch import BatchFn, UserCodeError, call_user, default_batch_to_target
from lightning_diag.functional.ensemble import COMBINE, combine_outputs
from lightning_diag.functional.task import Task, infer_task, select_output
from lightning_diag.inference.checkpoints import (
    PathLike,
    check_state_dict,
    load_checkpoint,
    module_from_checkpoint,
    state_dict_of,
)
from lightning_diag.inference.kept_calls import KeptCall, leaves
from lightning_diag.inference.logged import LoggedMetrics, reset_metrics
from lightning_diag.isolation import clone_module, preserved_rng

__all__ = ["EnsembleError", "EnsembleModel", "evaluate_members", "train_ensemble",
           "train_top_configs"]


class EnsembleError(ValueError):
    """The members cannot be combined or compared: outputs without a float tensor or of
    different shapes, no ``validation_step``, no single module making the prediction, no batch.
    """


class EnsembleModel(nn.Module):
    """An ``nn.Module`` whose forward combines its members' predictions.

    ``forward(*args, **kwargs)`` calls every member with the same arguments. In each member's
    output the prediction is the tensor itself, a dict's ``logits`` (or first float tensor), or
    a tuple's first float tensor (``(log_probs, hidden)``), as
    :func:`~lightning_diag.functional.task.select_output` reads it; the predictions are
    combined and the rest of the output (a hidden state) is the first member's.

    Args:
        models: The members; each maps the same arguments to predictions of the same shape.
        combine: ``"mean_prob"`` (the mean of probabilities, or of outputs for regression),
            ``"mean_logit"`` (the mean of the outputs as they are) or ``"vote"`` (the fraction of
            members per class); see :func:`~lightning_diag.functional.ensemble.combine_outputs`.
        task: What the predictions are (a :class:`~lightning_diag.functional.task.Task`, as
            ``infer_task(output, target)`` gives it; :func:`evaluate_members` infers it). None:
            a prediction with two or more dimensions and two or more entries in dimension 1 is
            read as class scores over dimension 1 (logits, log-probabilities or probabilities,
            told apart by their values), anything else as regression values. Set it for
            multi-label outputs and ``(N, T, V)`` scores.
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "mean_prob",
                 task: Task | None = None) -> None:
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("`models` must be a non-empty sequence of nn.Module, got "
                             f"{[type(m).__name__ for m in models]}.")
        if combine not in COMBINE:
            raise ValueError(f"`combine` must be one of {COMBINE}, got {combine!r}.")
        if task is not None and not isinstance(task, Task):
            raise TypeError(f"`task` must be a Task or None, got {type(task).__name__}.")
        self.members = nn.ModuleList(models)
        self.combine = combine
        self.task = task

    def member_outputs(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The members' predictions, stacked as ``(K, ...)``."""
        return _stack([_prediction(m(*args, **kwargs)) for m in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.merge([m(*args, **kwargs) for m in self.members])

    def merge(self, outputs: Sequence[Any]) -> Any:
        """One output from the members' ``outputs`` of one call (see the class docstring)."""
        predictions = [_prediction(o) for o in outputs]
        combined = combine_outputs(_stack(predictions), self.task_for(predictions[0]),
                                   self.combine)
        return _replaced(outputs[0], predictions[0], combined)

    def task_for(self, prediction: torch.Tensor) -> Task:
        """``task`` when set, else what the class docstring says of ``prediction``."""
        if self.task is not None:
            return self.task
        if prediction.dim() >= 2 and prediction.shape[1] >= 2:
            # A target of class indices in the implied shape lets functional.task, the one
            # place that knows the rule, tell logits, log-probabilities and probabilities apart.
            shape = (prediction.shape[0], *prediction.shape[2:])
            return infer_task(prediction, torch.zeros(shape, dtype=torch.long,
                                                      device=prediction.device))
        return Task("regression", "values", reason="a prediction without a class dimension")

    @classmethod
    def from_checkpoints(cls, module_class: type[nn.Module], paths: Sequence[PathLike],
                         map_location: str | torch.device = "cpu", combine: str = "mean_prob",
                         trust: bool = False, **kwargs: Any) -> EnsembleModel:
        """Build one member per checkpoint, in eval mode on ``map_location``.

        Every file is read safely (``weights_only=True`` onto the CPU) and every member's keys
        and shapes are checked before any weights are loaded. Each member is
        ``module_class(**hyper_parameters)`` from its checkpoint, overridden by ``kwargs``. Set
        ``.task`` on the result for outputs the default rule misreads.

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


def _describe(task: Task, combine: str) -> str:
    """How predictions of ``task`` are combined, in words, for messages."""
    if not task.is_classification or combine == "mean_logit":
        what = (f"task unknown: {task.reason}; pass `batch_to_target=` if they are class "
                "scores" if task.kind == "unknown" else task.describe())
        return f"the mean of the members' outputs ({what})"
    if combine == "vote":
        return f"the fraction of members voting for each class ({task.describe()})"
    return (f"the mean of the members' probabilities ({task.describe()}), handed back as "
            f"{task.scores.replace('_', '-')}")


def _prediction(output: Any) -> torch.Tensor:
    prediction = select_output(output)
    if prediction is None:
        raise EnsembleError(f"A member's output ({type(output).__name__}) holds no float "
                            "tensor to combine.")
    return prediction


def _stack(predictions: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in predictions}
    if len(shapes) > 1:
        raise EnsembleError(f"The members' predictions differ in shape ({sorted(shapes)}): "
                            "an ensemble needs members that predict the same thing.")
    return torch.stack(predictions)


def _replaced(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with its prediction ``old`` replaced by ``new``, its structure kept."""
    if output is old:
        return new
    if isinstance(output, Mapping):
        key = next(k for k, v in output.items() if v is old)
        # a copy keeps the type (a Hugging Face ModelOutput sets its attribute too)
        out = copy.copy(output) if isinstance(output, MutableMapping) else dict(output)
        out[key] = new
        return out
    items = [new if item is old else item for item in output]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


@torch.no_grad()
def evaluate_members(models: Sequence[pl.LightningModule], batches: Iterable[Any],
                     combine: str = "mean_prob", device: torch.device | str | None = None,
                     task: Task | None = None,
                     batch_to_target: BatchFn = default_batch_to_target) -> dict[str, Any]:
    """Each member and their ensemble, measured by the members' own ``validation_step``.

    For every batch each member runs its ``validation_step``, and a copy of the first member
    runs it again as the ensemble: the module that computes the step's prediction (the
    LightningModule itself when the step calls ``self(...)``, else the one direct submodule with
    parameters it calls, such as ``self.net``) returns the members' combined output
    (:class:`EnsembleModel`), computed from the same arguments (the members' outputs of their
    own steps of the batch, when those got the same arguments). What the steps log is reduced as
    Lightning reduces it at epoch end (batch-size-weighted means, ``compute()`` of torchmetrics
    objects), so the ensemble is scored by the user's own loss and metrics, for any task.

    Args:
        models: The members: LightningModules of one class, with a ``validation_step``. They
            run in eval mode (restored after); their torchmetrics objects are reset first.
        batches: The validation batches, read once.
        combine: See :class:`EnsembleModel`.
        device: Where batches go; default the first member's device.
        task: What the predictions are; default ``infer_task`` on the first batch's
            prediction and target.
        batch_to_target: Reads the target of a batch, for the task.

    Returns:
        ``{"members": [{name: value}, ...], "ensemble": {name: value}, "combined": how}``.

    Raises:
        EnsembleError: (a ValueError) a member has no ``validation_step``, no batch came, the
            step computes its prediction in no single module, or the predictions differ.
        UserCodeError: a ``validation_step`` (or ``batch_to_target``) raised.

    Example:
        >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
        >>> dm = DigitsDataModule(); dm.setup("fit")
        >>> res = evaluate_members([DigitsClassifier(arch="mlp"), DigitsClassifier(arch="mlp")],
        ...                        dm.val_dataloader())
        >>> sorted(res["ensemble"]), len(res["members"])
        (['val_acc', 'val_loss'], 2)
    """
    members = list(models)
    _check_members(members)
    where = torch.device(device) if device is not None else members[0].device
    logs = [LoggedMetrics() for _ in range(len(members) + 1)]
    modes = [m.training for m in members]
    merge: _Merge | None = None
    with preserved_rng():
        host = clone_module(members[0])
        try:
            for m in [*members, host]:
                m.eval()
                reset_metrics(m)
            for idx, batch in enumerate(batches):
                batch = move_data_to_device(batch, where)
                if merge is None:  # the first batch tells where the prediction is made
                    merge = _Merge.locate(
                        members, host, partial(_step, members[0], batch, idx, logs[0]), combine,
                        task, partial(_target, batch_to_target, batch))
                else:
                    _step(members[0], batch, idx, logs[0])
                for member, log in zip(members[1:], logs[1:-1], strict=True):
                    _step(member, batch, idx, log)
                merge.step(host, batch, idx, logs[-1])
        finally:
            if merge is not None:
                merge.remove()
            for m, mode in zip(members, modes, strict=True):
                m.train(mode)
    if merge is None:
        raise EnsembleError("evaluate_members: the batches were empty.")
    rows = [log.values() for log in logs]
    return {"members": rows[:-1], "ensemble": rows[-1], "combined": merge.describe(combine)}


#: Calls of a member's module per batch whose outputs are kept for the ensemble's step.
_KEEP = 8


class _Merge:
    """Where the members' predictions are merged: the module making the step's prediction in
    the host copy (``site``, "" for the module itself) returns the ensemble's output instead
    of its own.

    Each member's output at the site in its own step of the batch is kept (not copied) with
    the arguments it was made from, for its first :data:`_KEEP` calls (a step generating a
    sequence token by token would hold every step's output). The host's call with the same
    arguments (the same tensors unchanged since, or equal ones) merges those outputs; any other
    call runs the members on the host's arguments. So each member runs once per batch, and
    the host's module not at all.
    """

    def __init__(self, site: str, task: Task, ensemble: EnsembleModel, host_site: nn.Module,
                 first: list[KeptCall]) -> None:
        self.site, self.task, self.ensemble, self.host_site = site, task, ensemble, host_site
        self.members = list(ensemble.members)
        self.seen: list[list[KeptCall]] = [first[:_KEEP], *[[] for _ in self.members[1:]]]
        self.calls, self.recording = 0, True
        self.handles = [m.register_forward_hook(partial(self._record, k), with_kwargs=True)
                        for k, m in enumerate(self.members)]
        # an instance attribute, not a hook: the host's own forward never runs (a compiled
        # module keeps its forward there: put back on removal)
        self.own_forward = vars(host_site).get("forward")
        host_site.forward = self._forward  # type: ignore[method-assign]

    @classmethod
    def locate(cls, members: list[pl.LightningModule], host: pl.LightningModule,
               first_step: Callable[[], None], combine: str, task: Task | None,
               target: Callable[[], Any]) -> _Merge:
        """Run the first member's ``first_step`` to find the site and the task, and set the
        host's module there to return the ensemble's output."""
        site, first = _locate(members[0], first_step)
        chosen = task or infer_task(select_output(first[0].output), target())
        ensemble = EnsembleModel([_submodule(m, site) for m in members], combine, chosen)
        return cls(site, chosen, ensemble, _submodule(host, site), first)

    def _record(self, k: int, module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any], output: Any) -> None:
        if self.recording and len(self.seen[k]) < _KEEP:
            self.seen[k].append(KeptCall.of(args, kwargs, output))

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        call, self.calls = self.calls, self.calls + 1
        now = leaves((args, kwargs))
        outputs = []
        for member, seen in zip(self.members, self.seen, strict=True):
            kept = seen[call] if call < len(seen) else None
            outputs.append(kept.output if kept is not None and kept.same(now)
                           else member(*args, **kwargs))
        return self.ensemble.merge(outputs)

    def step(self, host: pl.LightningModule, batch: Any, idx: int, log: LoggedMetrics) -> None:
        """The host's step, its prediction the ensemble's; the batch's kept outputs are
        dropped after it."""
        self.recording = False
        try:
            _step(host, batch, idx, log)
        except UserCodeError as err:  # the merge, not the user's code, failed in there
            if isinstance(err.error, EnsembleError):
                raise err.error from None
            raise
        finally:
            self.recording, self.calls = True, 0
            for seen in self.seen:
                seen.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.own_forward is None:
            del self.host_site.forward
        else:
            self.host_site.forward = self.own_forward  # type: ignore[method-assign]

    def describe(self, combine: str) -> str:
        return f"{_describe(self.task, combine)}, at {_site_name(self.site)}"


def _check_members(members: list[Any]) -> None:
    plain = [type(m).__name__ for m in members if not isinstance(m, pl.LightningModule)
             or type(m).validation_step is pl.LightningModule.validation_step]
    if not members or plain:
        raise EnsembleError("evaluate_members needs LightningModules with a `validation_step`, "
                            f"whose metrics it compares; got {plain or 'no model'}.")


def _step(module: pl.LightningModule, batch: Any, idx: int, log: LoggedMetrics) -> None:
    with log.attached(module, batch):
        call_user(f"`{type(module).__name__}.validation_step`", module.validation_step, batch,
                  idx)


def _target(batch_to_target: BatchFn, batch: Any) -> Any:
    if batch_to_target is default_batch_to_target:  # never raises: None when there is none
        return batch_to_target(batch)
    return call_user("`batch_to_target`", batch_to_target, batch)


def _locate(module: pl.LightningModule, run: Callable[[], None]) -> tuple[str, list[KeptCall]]:
    """Run ``run`` (a step of ``module``) and return the name of the module that made its
    prediction ("" for ``module`` itself) and that module's calls in the step."""
    calls: list[tuple[str, KeptCall]] = []
    candidates = {"": module, **{name: child for name, child in module.named_children()
                                 if next(child.parameters(), None) is not None}}
    handles = [m.register_forward_hook(
        lambda _m, args, kwargs, out, name=name: calls.append(
            (name, KeptCall.of(args, kwargs, out))), with_kwargs=True)
        for name, m in candidates.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    called = list(dict.fromkeys(name for name, _ in calls))
    site = "" if "" in called else called[0] if len(called) == 1 else None
    if site is None:
        raise EnsembleError(
            f"`{type(module).__name__}.validation_step` calls {len(called)} submodules with "
            f"parameters ({called}) and never the module itself, so no single module makes its "
            "prediction: define `forward` and call `self(...)` in the step to have the ensemble "
            "combine whole predictions.")
    return site, [call for name, call in calls if name == site]


def _submodule(module: nn.Module, name: str) -> nn.Module:
    return module if not name else module.get_submodule(name)


def _site_name(site: str) -> str:
    return "the module's forward" if not site else f"`self.{site}`"


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
