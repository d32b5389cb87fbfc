"""Inference helpers: put the weight average saved by :class:`EMAWeights` into a model.

Example:
    >>> from lightning_diag.examples.digits import DigitsClassifier
    >>> from lightning_diag.inference.ema import load_ema_weights
    >>> model = load_ema_weights(DigitsClassifier(), "last.ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from lightning_diag.inference.checkpoints import (
    CheckpointLoadError,
    PathLike,
    check_state_dict,
    load_checkpoint,
)

__all__ = ["load_ema_weights"]

#: ``EMAWeights.state_key`` starts with the class name (kept as text: inference needs no callback).
_EMA_STATE_PREFIX = "EMAWeights"


def load_ema_weights(module: nn.Module, checkpoint_path: PathLike, *,
                     trust: bool = False) -> nn.Module:
    """Put the averaged weights saved by :class:`EMAWeights` into ``module`` for inference.

    Loads with ``weights_only=True`` on the CPU; keys and shapes are checked before anything is
    copied. Returns ``module``.

    Raises:
        CheckpointLoadError: unreadable file, no EMA state, or an architecture mismatch.
    """
    checkpoint = load_checkpoint(checkpoint_path, trust=trust)
    callbacks = checkpoint.get("callbacks") or {}
    states = [v for k, v in callbacks.items()
              if str(k).startswith(_EMA_STATE_PREFIX) and isinstance(v, dict) and "ema" in v]
    if not states or not states[0]["ema"]:
        raise CheckpointLoadError(checkpoint_path, "it holds no EMA state",
                                  "Train with the EMAWeights callback and save a checkpoint "
                                  "during or after fit.")
    ema = states[0]["ema"]
    check_state_dict(module, ema, checkpoint_path)
    module.load_state_dict(ema)
    return module
