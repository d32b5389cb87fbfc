"""Side experiments that leave the main run bit-identical.

A side experiment (gradient check, overfit test, LR sweep) works on a deep copy of the module,
reads batches through its own sequential loader over the training *dataset* (the user's sampler
and its generator are never advanced), and restores every RNG stream in ``finally``. Anything the
copy's ``training_step`` logs with ``self.log`` is dropped.

Example:
    >>> import torch
    >>> from lightning_diag.isolation import preserved_rng
    >>> before = torch.get_rng_state()
    >>> with preserved_rng():
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import copy
import itertools
import pickle
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_diag.batch import call_user, map_floats
from lightning_diag.validation import check_choice, check_int, check_number

__all__ = [
    "OptimizationSettings",
    "RNGState",
    "SideTraining",
    "StepState",
    "clone_module",
    "disable_regularization",
    "first_batches",
    "first_loader",
    "fresh_optimizer",
    "preserved_rng",
    "side_experiment",
    "train_dataloader_of",
]


@dataclass
class RNGState:
    """Every global random stream: Python, NumPy, torch CPU and every CUDA device."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)


@contextmanager
def preserved_rng() -> Iterator[RNGState]:
    """Restore every global RNG stream on exit, even when the body raises."""
    state = RNGState.capture()
    try:
        yield state
    finally:
        state.restore()


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log``/``self.log_dict`` on a copy: nothing reaches the real logs."""


def clone_module(module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of ``module`` that shares its trainer reference but logs nothing.

    The trainer (and its dataloaders, loggers, callbacks) is not copied: the copy points at the
    same trainer so that ``self.trainer``-dependent code still runs. A tensor attribute still
    attached to the last step's graph (a recurrent ``self.hidden`` the step detaches only when it
    next reads it), which deepcopy refuses, is copied detached: the same value, no history.
    """
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = trainer
    for m in module.modules():
        for value in vars(m).values():
            for t in _graph_tensors(value):
                memo[id(t)] = t.detach().clone()
    try:
        clone = copy.deepcopy(module, memo)
    # what deepcopy raises on an uncopyable attribute: TypeError (a lock, an open file),
    # RuntimeError (a non-leaf tensor), copy.Error and pickle.PicklingError (custom reducers)
    except (TypeError, RuntimeError, copy.Error, pickle.PicklingError) as err:
        raise RuntimeError(
            f"lightning_diag could not copy {type(module).__name__} for a side experiment "
            f"({type(err).__name__}: {err}). Make the module deep-copyable or remove this callback."
        ) from err
    clone.log = _no_log  # type: ignore[method-assign]
    clone.log_dict = _no_log  # type: ignore[method-assign]
    return clone


@contextmanager
def side_experiment(module: pl.LightningModule) -> Iterator[pl.LightningModule]:
    """Yield an isolated copy of ``module``; every RNG stream is restored afterwards."""
    with preserved_rng(), torch.enable_grad():
        clone = clone_module(module)
        try:
            yield clone
        finally:
            del clone


def train_dataloader_of(trainer: pl.Trainer) -> DataLoader:
    """The user's training DataLoader (the first one when there are several), not iterated.

    Raises:
        ValueError: no training dataloader, or one that is not a ``torch.utils.data.DataLoader``.
    """
    loader: Any = getattr(trainer, "train_dataloader", None)
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            loader = source.dataloader()
    loader = first_loader(loader)
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "lightning_diag needs a torch DataLoader for training (from `train_dataloaders=`, "
            f"`train_dataloader()` or a datamodule), got {type(loader).__name__}."
        )
    return loader


def first_loader(obj: Any) -> Any:
    """The first DataLoader inside a loader, a CombinedLoader, a list or a dict of loaders."""
    inner = getattr(obj, "iterables", None)  # CombinedLoader
    if inner is not None:
        obj = inner
    if isinstance(obj, Mapping):
        return first_loader(next(iter(obj.values()), None))
    if isinstance(obj, Sequence) and not isinstance(obj, (DataLoader, str)):
        return first_loader(obj[0] if obj else None)
    return obj


def first_batches(loader: DataLoader, num_batches: int, device: torch.device) -> list[Any]:
    """The first ``num_batches`` batches in dataset order, without touching ``loader``'s sampler.

    Map-style datasets are read sequentially by index (through ``__getitems__`` when the dataset
    has it, as a DataLoader does) with the loader's batch size and collate function; iterable
    datasets through a fresh iterator, in the main process. A loader with ``batch_size=None``
    (no automatic batching: each item already is a batch) gives ``collate_fn(item)`` per item,
    as it does. Call it inside :func:`preserved_rng`: the dataset's own code may draw random
    numbers.

    Raises:
        ValueError: the dataset yields no batch.
        UserCodeError: the dataset's ``__getitem__``/``__getitems__``/``__iter__`` or the
            loader's ``collate_fn`` raised (named, with the exception type and message).
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dataset: Dataset = loader.dataset
    batched = loader.batch_sampler is not None  # DataLoader's own test of automatic batching
    batch_size = (loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 32
                  if batched else 1)
    collate = getattr(loader.collate_fn, "__name__", type(loader.collate_fn).__name__)
    batches: list[Any] = []
    for samples in itertools.islice(_sample_lists(dataset, batch_size), num_batches):
        batch = call_user(f"the training loader's `collate_fn` ({collate})", loader.collate_fn,
                          samples if batched else samples[0])
        batches.append(move_data_to_device(batch, device))
    if not batches:
        raise ValueError(
            "The training dataloader yielded no batch (empty dataset?). Give the Trainer training "
            "data before running lightning_diag checks."
        )
    return batches


def _sample_lists(dataset: Dataset, batch_size: int) -> Iterator[list[Any]]:
    """Lists of ``batch_size`` samples in dataset order (the last may be shorter), not collated."""
    name = type(dataset).__name__
    if isinstance(dataset, IterableDataset):
        samples = call_user(f"`{name}.__iter__`", iter, dataset)
        while chunk := call_user(f"`{name}.__iter__`", _take, samples, batch_size):
            yield chunk
        return
    getitems = getattr(dataset, "__getitems__", None)
    for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
        index = list(range(start, min(start + batch_size, len(dataset))))  # type: ignore[arg-type]
        if getitems:
            yield call_user(f"`{name}.__getitems__`", getitems, index)
        else:
            yield [call_user(f"`{name}.__getitem__` (index {i})", dataset.__getitem__, i)
                   for i in index]


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(iterator, n))


def fresh_optimizer(module: pl.LightningModule) -> torch.optim.Optimizer:
    """The first optimizer of ``module.configure_optimizers()``, whatever shape it returns.

    Raises:
        UserCodeError: ``configure_optimizers`` raised.
        ValueError: it returned no torch optimizer.
    """
    out: Any = call_user(f"`{type(module).__name__}.configure_optimizers`",
                         module.configure_optimizers)
    for _ in range(4):
        if isinstance(out, torch.optim.Optimizer):
            return out
        if isinstance(out, Mapping):
            out = out.get("optimizer")
        elif isinstance(out, (list, tuple)) and out:
            out = out[0]
        else:
            break
    raise ValueError(
        "`configure_optimizers()` returned no torch optimizer "
        f"(got {type(out).__name__}); lightning_diag needs one for this side experiment."
    )


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def disable_regularization(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, reg_attr: str | None
) -> list[str]:
    """Turn regularization off on a copy: dropout, optimizer weight decay and ``reg_attr``.

    BatchNorm stays in train mode. Returns a description of what was turned off.
    """
    changed: list[str] = []
    dropouts = [m for m in module.modules() if isinstance(m, _DROPOUT)]
    for m in dropouts:
        m.eval()
    if dropouts:
        changed.append(f"{len(dropouts)} dropout layer(s)")
    if optimizer is not None:
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0):
                group["weight_decay"] = 0.0
                changed.append("optimizer weight decay")
    if reg_attr:
        set_reg_strength(module, reg_attr, 0.0)
        changed.append(f"`{reg_attr}`")
    return sorted(set(changed))


def get_reg_strength(module: torch.nn.Module, reg_attr: str) -> float:
    """Read a regularization strength from an attribute or ``hparams`` entry of ``module``."""
    if hasattr(module, reg_attr):
        return float(getattr(module, reg_attr))
    hparams = getattr(module, "hparams", None)
    if hparams is not None and reg_attr in hparams:
        return float(hparams[reg_attr])
    raise AttributeError(
        f"`reg_attr={reg_attr!r}`: {type(module).__name__} has no attribute or hparam of that name."
    )


def set_reg_strength(module: torch.nn.Module, reg_attr: str, value: float) -> None:
    """Set a regularization strength where :func:`get_reg_strength` found it."""
    if hasattr(module, reg_attr):
        setattr(module, reg_attr, value)
        return
    hparams = getattr(module, "hparams", None)
    if hparams is not None and reg_attr in hparams:
        hparams[reg_attr] = value
        return
    raise AttributeError(
        f"`reg_attr={reg_attr!r}`: {type(module).__name__} has no attribute or hparam of that name."
    )


@dataclass(frozen=True)
class OptimizationSettings:
    """How the main run turns a loss into an update, read from its Trainer in this one place.

    Side experiments that train (the overfit test; the learning-rate sweep, through its
    Trainer's arguments) apply them so that they train as the main run does: gradient clipping
    (Lightning's default ``configure_gradient_clipping``: ``clip_grad_norm_`` or
    ``clip_grad_value_`` over the optimizer's parameters, after unscaling), gradient
    accumulation (the loss divided by ``accumulate_grad_batches``, one step per window and at
    the end of a pass) and precision (``"bf16-mixed"``/``"16-mixed"``: autocast on the module's
    device, ``"16-mixed"`` with a gradient scaler; ``"64-true"``/``"bf16-true"``/``"16-true"``:
    module, float inputs and the default dtype converted). The defaults are a plain float32
    step, so the Trainer-free check functions need no Trainer.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(gradient_clip_val=0.25, accumulate_grad_batches=2, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> OptimizationSettings.from_trainer(trainer).describe()
        'gradient clipping (norm) at 0.25, 2 batches accumulated per step'
        >>> OptimizationSettings().describe()
        'no gradient clipping, no accumulation, 32-true precision'
    """

    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    precision: str = "32-true"

    #: Lightning precision string -> (dtype, autocast); others are refused by name.
    PRECISIONS: ClassVar[dict[str, tuple[torch.dtype, bool]]] = {
        "32-true": (torch.float32, False), "64-true": (torch.float64, False),
        "bf16-true": (torch.bfloat16, False), "16-true": (torch.float16, False),
        "bf16-mixed": (torch.bfloat16, True), "16-mixed": (torch.float16, True)}

    def __post_init__(self) -> None:
        check_number("gradient_clip_val", self.gradient_clip_val, low=0, optional=True)
        check_choice("gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value"))
        check_int("accumulate_grad_batches", self.accumulate_grad_batches)
        check_choice("precision", self.precision, tuple(self.PRECISIONS))

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> OptimizationSettings:
        """The settings of ``trainer``'s run.

        Raises:
            ValueError: a precision plugin the side experiments cannot reproduce (e.g.
                ``"transformer-engine"``), named.
        """
        algorithm = trainer.gradient_clip_algorithm
        return cls(gradient_clip_val=trainer.gradient_clip_val or None,  # 0 turns clipping off
                   gradient_clip_algorithm=str(getattr(algorithm, "value", algorithm or "norm")),
                   accumulate_grad_batches=int(trainer.accumulate_grad_batches),
                   precision=str(trainer.precision))

    @property
    def dtype(self) -> torch.dtype:
        return self.PRECISIONS[self.precision][0]

    @property
    def mixed(self) -> bool:
        return self.PRECISIONS[self.precision][1]

    def describe(self) -> str:
        """The settings in words, for findings."""
        parts = [f"gradient clipping ({self.gradient_clip_algorithm}) at "
                 f"{self.gradient_clip_val:g}" if self.gradient_clip_val else ""]
        if self.accumulate_grad_batches > 1:
            parts.append(f"{self.accumulate_grad_batches} batches accumulated per step")
        if self.precision != "32-true":
            parts.append(f"{self.precision} precision")
        if not any(parts):
            return "no gradient clipping, no accumulation, 32-true precision"
        return ", ".join(p for p in parts if p)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The ``pl.Trainer`` arguments that set these (the defaults left out).

        Example:
            >>> OptimizationSettings(gradient_clip_val=1.0, precision="64-true").trainer_kwargs()
            {'gradient_clip_val': 1.0, 'gradient_clip_algorithm': 'norm', 'precision': '64-true'}
        """
        kwargs: dict[str, Any] = {}
        if self.gradient_clip_val:
            kwargs.update(gradient_clip_val=self.gradient_clip_val,
                          gradient_clip_algorithm=self.gradient_clip_algorithm)
        if self.accumulate_grad_batches > 1:
            kwargs["accumulate_grad_batches"] = self.accumulate_grad_batches
        if self.precision != "32-true":
            kwargs["precision"] = self.precision
        return kwargs

    def prepare(self, module: torch.nn.Module) -> None:
        """Convert a copy to the run's dtype for the ``*-true`` precisions (before its optimizer
        is built, as Lightning does)."""
        if not self.mixed and self.dtype != torch.float32:
            module.to(self.dtype)

    def cast(self, batch: Any) -> Any:
        """The batch's float tensors in the run's dtype (``*-true`` precisions), else unchanged."""
        if self.mixed or self.dtype == torch.float32:
            return batch
        return map_floats(batch, lambda t: t.to(self.dtype))

    @contextmanager
    def forward_context(self, device: torch.device) -> Iterator[None]:
        """Autocast (mixed precisions) or the default dtype (``*-true``) around one step."""
        if self.mixed:
            with torch.autocast(device.type, dtype=self.dtype):
                yield
            return
        if self.dtype == torch.float32:  # Lightning's 32-true plugin changes nothing either
            yield
            return
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)

    def clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients of ``optimizer``'s parameters as Lightning's default does."""
        if not self.gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)


class SideTraining:
    """Optimizer steps on a copy, taken as the main run takes them (see
    :class:`OptimizationSettings`): the loss of each batch is backpropagated divided by the
    accumulation, and the optimizer steps when the window is full or the pass ends.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> run = SideTraining(opt, OptimizationSettings(gradient_clip_val=0.5), w.device)
        >>> run.backward(10 * w.sum(), last=True), w.item()  # gradient 10 clipped to 0.5
        (True, 0.5)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, settings: OptimizationSettings,
                 device: torch.device) -> None:
        self.optimizer, self.settings = optimizer, settings
        half = settings.precision == "16-mixed"  # Lightning's 16-mixed plugin scales the loss
        self.scaler = torch.amp.GradScaler(device.type) if half else None
        self.pending = 0
        optimizer.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> bool:
        """Backpropagate one batch's loss; step when the window is full or ``last``. Returns
        whether the optimizer stepped."""
        scaled = loss / self.settings.accumulate_grad_batches
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.pending += 1
        if self.pending < self.settings.accumulate_grad_batches and not last:
            return False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.settings.clip(self.optimizer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.pending = 0
        return True


class StepState:
    """What ``training_step`` may carry from one call to the next: the public attributes of a
    module and its submodules that hold tensors (alone or in tuples, lists, dicts) or None,
    such as a recurrent hidden state kept in ``self.hidden``.

    A copy starts from the live module's values (deepcopy); :meth:`restore` puts the captured
    values back (fresh clones, so an in-place change cannot leak), which repeated evaluations
    of the same point need. Parameters, buffers and submodules are not part of it.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> m.hidden = None
        >>> state = StepState(m)
        >>> m.hidden = torch.ones(3)
        >>> state.changed()
        ['hidden']
        >>> state.restore(); m.hidden is None, state.changed()
        (True, [])
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self._modules = dict(module.named_modules())
        self._saved = {name: {k: _clone_state(v, dtype) for k, v in vars(m).items()
                              if _carried(k, v)}
                       for name, m in self._modules.items()}

    def restore(self) -> None:
        """Put every captured attribute back; remove those a step added since."""
        for name, m in self._modules.items():
            saved = self._saved[name]
            for key in [k for k, v in vars(m).items() if _carried(k, v) and k not in saved]:
                delattr(m, key)
            for key, value in saved.items():
                setattr(m, key, _clone_state(value, None))

    def changed(self) -> list[str]:
        """Dotted names of the attributes whose value differs from the captured one."""
        names = []
        for name, m in self._modules.items():
            saved, now = self._saved[name], {k: v for k, v in vars(m).items() if _carried(k, v)}
            for key in sorted(set(saved) | set(now)):
                if key not in saved or key not in now or not _same_state(saved[key], now[key]):
                    names.append(f"{name}.{key}" if name else key)
        return names


def _graph_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside an attribute value (alone, or in tuples, lists, dicts) that are not graph
    leaves: the outputs of a step kept with their history."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _graph_tensors(v, depth + 1)
    elif depth < 4 and isinstance(value, Mapping):
        for v in value.values():
            yield from _graph_tensors(v, depth + 1)


def _carried(key: str, value: Any) -> bool:
    return not key.startswith("_") and (value is None or _holds_tensor(value))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not isinstance(value, torch.nn.Parameter)
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _clone_state(value: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone_state(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v, dtype) for v in value)
    if isinstance(value, Mapping):
        return type(value)({k: _clone_state(v, dtype) for k, v in value.items()})  # type: ignore[call-arg]
    return value


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and torch.equal(a, b.to(a.dtype)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a is b or a == b
