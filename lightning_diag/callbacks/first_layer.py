"""The first layer's filters as an image grid (step 5.4 of the recipe).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.first_layer import FirstLayerVisualization
    >>> trainer = pl.Trainer(callbacks=[FirstLayerVisualization(every_n_epochs=5)], logger=False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.findings import Finding, Severity
from lightning_diag.tensorboard.figures import Cell, annotated_grid, filter_grid, layer_label
from lightning_diag.tensorboard.tags import FIRST_LAYER_FILTERS
from lightning_diag.tensorboard.writer import log_dir, log_image
from lightning_diag.validation import check_int, check_sequence, check_str

__all__ = ["FirstLayerVisualization"]


class FirstLayerVisualization(DiagnosticCallback):
    """Draw the first Conv2d's filters (or a Linear's rows seen as images) as a normalized grid.

    Each filter is min-max normalized on its own, tiled into a grid (pixels enlarged to fill
    TensorBoard's image card) under a title naming the layer and its type (``net.0 (Conv2d):
    16 filters of 3x3; step 240``: TensorBoard shows no caption), and logged as the
    TensorBoard image ``5.4_first_layer/filters`` and as ``first_layer_step<N>.png`` in the
    run's log directory, every ``every_n_epochs`` epochs and at the end of training (once when
    both fall on the same step). No matplotlib figure is drawn: a draw costs a few
    milliseconds. Smooth, varied filters mean the layer learned; noisy ones suggest too little
    training or too little regularization. Filters with 3 input channels are drawn in colour,
    other channel counts as the channel mean. Without a layer to draw, one INFO finding
    ``first_layer.not_found``; else, at the end of training, one INFO verdict
    ``first_layer.summary``: the layer, its number of filters and the steps drawn.

    Args:
        every_n_epochs: Draw every this many epochs.
        input_shape: ``(C, H, W)`` or ``(H, W)`` of the images when the first layer is a Linear
            on flattened images; its ``in_features`` must equal the product.
        layer: Name of the module to draw instead of the first Conv2d.
        strict: Raise on FAIL findings (this callback emits only INFO).

    Example:
        >>> cb = FirstLayerVisualization(every_n_epochs=1, input_shape=(8, 8))
    """

    slug = "first_layer"

    def __init__(self, every_n_epochs: int = 10, input_shape: Sequence[int] | None = None,
                 layer: str | None = None, strict: bool = False) -> None:
        super().__init__(strict=strict)
        check_int("every_n_epochs", every_n_epochs)
        check_sequence("input_shape", input_shape, check_int, min_len=2, max_len=3, optional=True)
        check_str("layer", layer, optional=True)
        self.every_n_epochs = every_n_epochs
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.layer = layer
        self._drawn_step = -1
        self._draws: list[tuple[int, str, tuple[int, ...]]] = []  # (step, layer, weight shape)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs,
                                        input_shape=self.input_shape, layer=self.layer)

    def filters(self, pl_module: nn.Module) -> torch.Tensor | None:
        """The weights to draw as ``(out, C, H, W)``, or None when there is no such layer."""
        found = self._layer(pl_module)
        return None if found is None else found[1]

    def _layer(self, pl_module: nn.Module) -> tuple[str, torch.Tensor] | None:
        """The drawn layer's :func:`layer_label` and its weights as ``(out, C, H, W)``."""
        modules = dict(pl_module.named_modules())
        if self.layer is not None:
            if self.layer not in modules:
                raise ValueError(f"`layer` {self.layer!r} is not a module of the model; "
                                 f"modules: {[n for n in modules if n][:20]}.")
            candidates = [(self.layer, modules[self.layer])]
        else:
            candidates = [(n, m) for n, m in modules.items()
                          if isinstance(m, (nn.Conv2d, nn.Linear))]
        for name, m in candidates:
            if isinstance(m, nn.Conv2d):
                return layer_label(name, m), m.weight.detach()
            if isinstance(m, nn.Linear) and self.input_shape is not None:
                shape = self.input_shape if len(self.input_shape) == 3 else (1, *self.input_shape)
                if m.in_features == math.prod(shape):
                    return layer_label(name, m), m.weight.detach().reshape(m.out_features, *shape)
                if self.layer is None:
                    return None  # the first Linear does not see the images
        return None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module)
        if self._draws:  # else `first_layer.not_found` was the verdict
            self.publish(trainer, [self._summary(trainer)])

    def _summary(self, trainer: pl.Trainer) -> Finding:
        """The INFO verdict ``first_layer.summary``: what was drawn, how many times."""
        steps = [step for step, _, _ in self._draws]
        _, label, (out, channels, height, width) = self._draws[-1]
        return self.finding(
            trainer, f"{self.slug}.summary", Severity.INFO,
            f"First-layer filters: {out} filters of {label} ({channels}x{height}x{width}) drawn "
            f"{len(steps)} time(s), at step(s) {', '.join(map(str, steps))}; see "
            f"`{FIRST_LAYER_FILTERS}` and first_layer_step<N>.png in the log directory.",
            value=float(out), details={"layer": label, "drawn_at": steps})

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._drawn_step:
            return
        self._drawn_step = step
        found = self._layer(pl_module)  # on every rank, so that all report `not_found`
        if found is None:
            if not self.findings:
                self.publish(trainer, [self.finding(
                    trainer, f"{self.slug}.not_found", Severity.INFO,
                    "No first layer to draw: no Conv2d, and no Linear on images of "
                    f"`input_shape`={self.input_shape}.",
                    advice="Pass `input_shape=(C, H, W)` for an MLP on flattened images, or "
                           "`layer=` to name the module.")])
            return
        self._draws.append((step, found[0], tuple(found[1].shape)))  # every rank: the verdict
        if not trainer.is_global_zero:  # files and images from rank 0 only
            return
        if not self.require_tensorboard(trainer, "first-layer image") and log_dir(trainer) is None:
            return
        # The grid is already an image: no matplotlib figure to lay out and render (a few ms vs
        # ~100 ms); annotated_grid enlarges its pixels so that 3x3 filters stay visible.
        label, weight = found
        out, channels, height, width = weight.shape
        grid = filter_grid(weight)
        shown = {1: "", 3: ", in colour"}.get(channels, f", mean of {channels} input channels")
        image = annotated_grid(
            [[Cell(grid.permute(2, 0, 1) if grid.dim() == 3 else grid)]],
            f"{label}: {out} filters of {height}x{width}{shown}; step {step}",
            notes=["each filter scaled to its own range: black lowest, white highest"])
        log_image(trainer, FIRST_LAYER_FILTERS, image, step,
                  png_name=f"first_layer_step{step:07d}.png")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._drawn_step, self._draws = -1, []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"drawn_step": self._drawn_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._drawn_step = int(state_dict.get("drawn_step", -1))
