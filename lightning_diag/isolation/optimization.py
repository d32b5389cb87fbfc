"""How a side experiment optimizes a copy: its optimizer, regularization turned off, and the main
run's clipping, accumulation and precision (:class:`OptimizationSettings`, :class:`SideTraining`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from lightning_diag.batch import UserCodeError, call_user, map_floats, refusal_in
from lightning_diag.validation import check_choice, check_int, check_number

__all__ = [
    "OptimizationSettings",
    "SideTraining",
    "configured_optimizers",
    "disable_regularization",
    "fresh_optimizer",
    "get_reg_strength",
    "set_reg_strength",
]


def fresh_optimizer(module: pl.LightningModule) -> torch.optim.Optimizer:
    """The first optimizer of ``module.configure_optimizers()``, whatever shape it returns.

    Raises:
        UserCodeError: ``configure_optimizers`` raised.
        ValueError: it returned no torch optimizer.
    """
    return configured_optimizers(module)[0][0]


def configured_optimizers(module: pl.LightningModule) -> tuple[list[torch.optim.Optimizer],
                                                               list[Any]]:
    """Every optimizer and LR scheduler of ``module.configure_optimizers()``, in order, from any
    shape Lightning accepts: an optimizer, a list or tuple of them, a dict with ``"optimizer"``
    (and ``"lr_scheduler"``, a scheduler or a dict with ``"scheduler"``), a list of such dicts,
    or a tuple ``(optimizers, schedulers)``.

    Raises:
        UserCodeError: ``configure_optimizers`` raised.
        RefusedOnACopy: (a ValueError) on a copy, it read from ``self.trainer`` what could act
            on the real run (:class:`~lightning_diag.isolation.TrainerView`).
        ValueError: it returned no torch optimizer.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> class Two(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        ...     def configure_optimizers(self):
        ...         adam = torch.optim.Adam(self.a.parameters())
        ...         sched = torch.optim.lr_scheduler.StepLR(adam, 10)
        ...         return [{"optimizer": adam, "lr_scheduler": {"scheduler": sched}},
        ...                 {"optimizer": torch.optim.SGD(self.b.parameters(), lr=0.1)}]
        >>> optimizers, schedulers = configured_optimizers(Two())
        >>> [type(o).__name__ for o in optimizers], [type(s).__name__ for s in schedulers]
        (['Adam', 'SGD'], ['StepLR'])
    """
    try:
        out: Any = call_user(f"`{type(module).__name__}.configure_optimizers`",
                             module.configure_optimizers)
    except UserCodeError as err:  # it read what a copy's Trainer view refuses: a skip
        refused = refusal_in(err)
        if refused is None:
            raise
        raise refused from err
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []

    def walk(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.optim.Optimizer):
            optimizers.append(obj)
        elif isinstance(obj, Mapping):
            if "scheduler" in obj:
                walk(obj["scheduler"], depth + 1)
            for key in ("optimizer", "lr_scheduler"):
                if obj.get(key) is not None:
                    walk(obj[key], depth + 1)
        elif isinstance(obj, (list, tuple)) and depth < 3:
            for item in obj:
                walk(item, depth + 1)
        elif hasattr(obj, "step") and isinstance(getattr(obj, "optimizer", None),
                                                 torch.optim.Optimizer):
            schedulers.append(obj)  # an LRScheduler or ReduceLROnPlateau

    walk(out, 0)
    if not optimizers:
        raise ValueError(
            "`configure_optimizers()` returned no torch optimizer "
            f"(got {type(out).__name__}); lightning_diag needs one for this side experiment."
        )
    return optimizers, schedulers


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

    ``clips`` is the list in which the copy's
    :class:`~lightning_diag.isolation.trainer_view.TrainerView` records the step's own
    ``self.clip_gradients(...)`` calls (manual optimization): read at each optimizer step and
    applied after the backward, where the main run's step applies them.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> run = SideTraining(opt, OptimizationSettings(gradient_clip_val=0.5), w.device)
        >>> run.backward(10 * w.sum(), last=True), w.item()  # gradient 10 clipped to 0.5
        (True, 0.5)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, settings: OptimizationSettings,
                 device: torch.device, clips: list[tuple[float, str]] | None = None) -> None:
        self.optimizer, self.settings = optimizer, settings
        self.clips = clips if clips is not None else []
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
        for value, algorithm in self.clips:
            OptimizationSettings(value, algorithm).clip(self.optimizer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.pending = 0
        return True
