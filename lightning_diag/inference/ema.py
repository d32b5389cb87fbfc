"""Inference helpers: put the weight average saved by :class:`EMAWeights` into a model.

Example:
    >>> from lightning_diag.examples.digits import DigitsClassifier
    >>> from lightning_diag.inference.ema import load_ema_weights
    >>> model = load_ema_weights(DigitsClassifier(), "last.ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_diag.inference.checkpoints import (
    CheckpointLoadError,
    PathLike,
    check_state_dict,
    load_checkpoint,
)
from lightning_diag.validation import check_number, check_str

__all__ = ["load_ema_weights"]

#: ``EMAWeights.state_key`` starts with the class name (kept as text: inference needs no callback).
_EMA_STATE_PREFIX = "EMAWeights"


def load_ema_weights(module: nn.Module, checkpoint_path: PathLike, *,
                     decay: float | None = None, key: str | None = None,
                     trust: bool = False) -> nn.Module:
    """Put the averaged weights saved by :class:`EMAWeights` into ``module`` for inference.

    Loads with ``weights_only=True`` on the CPU; keys and shapes are checked before anything is
    copied. A run with several EMAWeights saves one average each, under its ``state_key``
    (``EMAWeights{'decay': 0.999, ...}``): choose one by ``decay=`` or by the whole ``key=``.
    Returns ``module``.

    Args:
        module: The model to load the average into.
        checkpoint_path: A checkpoint written during or after a fit with EMAWeights.
        decay: Load the average of the EMAWeights with this ``decay``.
        key: Load the average saved under this ``state_key``.
        trust: Load with ``weights_only=False`` (only for files you trust).

    Raises:
        CheckpointLoadError: unreadable file, no EMA state, no average matching ``decay`` and
            ``key`` or several (the message lists them), or an architecture mismatch.
    """
    check_number("decay", decay, low=0, high=1, high_open=True, optional=True)
    check_str("key", key, optional=True)
    checkpoint = load_checkpoint(checkpoint_path, trust=trust)
    callbacks = checkpoint.get("callbacks") or {}
    states = {str(k): v for k, v in callbacks.items()
              if str(k).startswith(_EMA_STATE_PREFIX) and isinstance(v, dict) and v.get("ema")}
    if not states:
        raise CheckpointLoadError(checkpoint_path, "it holds no EMA state",
                                  "Train with the EMAWeights callback and save a checkpoint "
                                  "during or after fit.")
    ema = _chosen_average(states, decay, key, checkpoint_path)
    check_state_dict(module, ema, checkpoint_path)
    module.load_state_dict(ema)
    return module


def _chosen_average(states: dict[str, dict[str, Any]], decay: float | None, key: str | None,
                    checkpoint_path: PathLike) -> dict[str, Any]:
    """The one average of ``states`` (by state key) matching ``decay`` and ``key``."""
    chosen = [s for k, s in states.items() if (key is None or k == key)
              and (decay is None or s.get("decay") == float(decay))]
    if len(chosen) == 1:
        return chosen[0]["ema"]
    listed = "; ".join(f"decay {s.get('decay', 'unknown')} under key {k!r}"
                       for k, s in states.items())
    asked = " and ".join(f"{n}={v!r}" for n, v in (("decay", decay), ("key", key))
                         if v is not None)
    reason = (f"no EMA average matches {asked}" if not chosen
              else f"it holds {len(chosen)} EMA averages")
    raise CheckpointLoadError(checkpoint_path, f"{reason} (saved: {listed})",
                              "Choose one with `decay=` or `key=`.")
