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
from lightning_diag.findings import Severity
from lightning_diag.tensorboard.figures import filter_grid
from lightning_diag.tensorboard.tags import FIRST_LAYER_FILTERS
from lightning_diag.tensorboard.writer import log_dir, log_image
from lightning_diag.validation import check_int, check_sequence, check_str

__all__ = ["FirstLayerVisualization"]


class FirstLayerVisualization(DiagnosticCallback):
    """Draw the first Conv2d's filters (or a Linear's rows seen as images) as a normalized grid.

    Each filter is min-max normalized on its own, tiled into a grid (pixels enlarged to about
    256 px), and logged as the TensorBoard image ``diag/first_layer/filters`` and as
    ``first_layer_step<N>.png`` in the run's log directory, every ``every_n_epochs`` epochs and
    at the end of training (once when both fall on the same step). No matplotlib figure is
    drawn: a draw costs about a millisecond. Smooth,
    varied filters mean the layer learned; noisy ones suggest too little training or too little
    regularization. Filters with 3 input channels are drawn in colour,
    other channel counts as the channel mean. Without a layer to draw, one INFO finding
    ``first_layer.not_found``.

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

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs,
                                        input_shape=self.input_shape, layer=self.layer)

    def filters(self, pl_module: nn.Module) -> torch.Tensor | None:
        """The weights to draw as ``(out, C, H, W)``, or None when there is no such layer."""
        modules = dict(pl_module.named_modules())
        if self.layer is not None:
            if self.layer not in modules:
                raise ValueError(f"`layer` {self.layer!r} is not a module of the model; "
                                 f"modules: {[n for n in modules if n][:20]}.")
            candidates = [modules[self.layer]]
        else:
            candidates = [m for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in candidates:
            if isinstance(m, nn.Conv2d):
                return m.weight.detach()
            if isinstance(m, nn.Linear) and self.input_shape is not None:
                shape = self.input_shape if len(self.input_shape) == 3 else (1, *self.input_shape)
                if m.in_features == math.prod(shape):
                    return m.weight.detach().reshape(m.out_features, *shape)
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

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._drawn_step:
            return
        self._drawn_step = step
        weight = self.filters(pl_module)  # on every rank, so that all report `not_found`
        if weight is None:
            if not self.findings:
                self.publish(trainer, [self.finding(
                    trainer, f"{self.slug}.not_found", Severity.INFO,
                    "No first layer to draw: no Conv2d, and no Linear on images of "
                    f"`input_shape`={self.input_shape}.",
                    advice="Pass `input_shape=(C, H, W)` for an MLP on flattened images, or "
                           "`layer=` to name the module.")])
            return
        if not trainer.is_global_zero:  # files and images from rank 0 only
            return
        if not self.require_tensorboard(trainer, "first-layer image") and log_dir(trainer) is None:
            return
        # The grid is already an image: no matplotlib figure to lay out and render (~1 ms vs
        # ~100 ms); pixels are enlarged so that 3x3 filters stay visible.
        grid = filter_grid(weight)
        zoom = max(1, 256 // max(grid.shape[0], grid.shape[1]))
        grid = grid.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
        log_image(trainer, FIRST_LAYER_FILTERS,
                  (grid * 255).round().to(torch.uint8).numpy(), step,
                  png_name=f"first_layer_step{step:07d}.png")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._drawn_step = -1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"drawn_step": self._drawn_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._drawn_step = int(state_dict.get("drawn_step", -1))
