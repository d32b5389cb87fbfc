"""Safe checkpoint reading: every checkpoint lightning_diag reads goes through `load_checkpoint`.

A checkpoint is loaded with ``torch.load(weights_only=True, map_location="cpu")``: unpickling can
only build tensors and plain containers, never run code from the file. Nothing here falls back to
unsafe loading by itself; ``trust=True`` is the one explicit opt-in. Every failure raises
:class:`CheckpointLoadError`, which names the file and says what is wrong: missing, empty,
truncated, not a checkpoint, needs pickled globals (listed), or does not match the architecture
(missing/unexpected keys and shape mismatches, all listed).

A plain Lightning checkpoint of a module whose ``save_hyperparameters()`` holds only numbers,
strings, lists and dicts (e.g. :class:`~lightning_diag.examples.DigitsClassifier`) needs no
allowlisted globals. Hyperparameters holding other objects (a ``Path``, an ``nn.Module``, an enum)
make ``weights_only`` loading fail; the error lists the globals so that the user can allowlist them
with ``torch.serialization.add_safe_globals`` or pass ``trust=True`` for a file they trust.

Example:
    >>> import torch, tempfile, os
    >>> from lightning_diag.inference.checkpoints import load_checkpoint, CheckpointLoadError
    >>> path = os.path.join(tempfile.mkdtemp(), "w.ckpt")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    >>> load_checkpoint(path)["state_dict"]["w"].tolist()
    [1.0, 1.0]
    >>> try:
    ...     load_checkpoint(path + ".missing")
    ... except CheckpointLoadError as err:
    ...     print(err.reason)
    file not found
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_diag.validation import check_flag

__all__ = [
    "CheckpointLoadError",
    "check_state_dict",
    "load_checkpoint",
    "module_from_checkpoint",
    "state_dict_of",
]

PathLike = str | os.PathLike[str]


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message names the file.

    Attributes:
        path: The checkpoint file.
        reason: What is wrong, in a few words (e.g. ``"file not found"``).
        missing: Keys the model expects that the checkpoint lacks.
        unexpected: Keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` for every shape mismatch.
        unsafe_globals: Pickled globals the file needs that ``weights_only`` loading refuses.
    """

    def __init__(self, path: PathLike, reason: str, advice: str = "", *,
                 missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
                 unsafe_globals: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.reason = reason
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.unsafe_globals = list(unsafe_globals)
        text = f"Cannot load checkpoint '{self.path}': {reason}."
        super().__init__(f"{text} {advice}" if advice else text)


#: What ``torch.load`` raised on checkpoints corrupted byte by byte (truncated, overwritten,
#: zip and legacy formats; torch 2.x): a damaged file, not a bug to hide.
_CORRUPT_FILE_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError,
                        TypeError, AssertionError, struct.error)


def load_checkpoint(path: PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``.

    Args:
        path: The checkpoint file.
        trust: Load with ``weights_only=False`` (runs pickled code): only for files you trust.

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointLoadError: missing, empty, truncated or corrupt file, not a checkpoint, or one
            that needs pickled globals (listed in the message and in ``unsafe_globals``).
    """
    check_flag("trust", trust)
    p = Path(path)
    if not p.exists():
        raise CheckpointLoadError(p, "file not found", "Check the path.")
    if not p.is_file():
        raise CheckpointLoadError(p, "not a file", "Give the path of a .ckpt/.pt file.")
    if p.stat().st_size == 0:
        raise CheckpointLoadError(p, "the file is empty", "It was probably cut off while saving.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(p, err) from err
    except _CORRUPT_FILE_ERRORS as err:
        reason = "truncated or corrupt file" if zipfile.is_zipfile(p) or _looks_zip(p) else (
            "not a PyTorch checkpoint")
        raise CheckpointLoadError(p, f"{reason} ({type(err).__name__}: {_first_line(err)})",
                                  "Re-save it with torch.save / Trainer.save_checkpoint.") from err
    if not isinstance(obj, dict):
        raise CheckpointLoadError(p, f"not a checkpoint (it holds a {type(obj).__name__}, not a "
                                  "dict)", "Give a Lightning checkpoint or a saved state_dict.")
    return obj


def _looks_zip(p: Path) -> bool:
    with p.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _unpickling_error(p: Path, err: pickle.UnpicklingError) -> CheckpointLoadError:
    if "weights only" not in str(err).lower() and "weights_only" not in str(err):
        return CheckpointLoadError(p, f"not a PyTorch checkpoint ({_first_line(err)})",
                                   "Give a file written by torch.save / Trainer.save_checkpoint.")
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    # ValueError: a legacy (non-zip) file; the others: a damaged archive. Fall back to the
    # names torch reported.
    except (ValueError, RuntimeError, pickle.UnpicklingError):
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    listed = ", ".join(names) or "unknown (see torch's message)"
    return CheckpointLoadError(
        p, f"it needs pickled globals that weights_only loading refuses: {listed}",
        "If you trust the file, allowlist them with torch.serialization.add_safe_globals([...]) "
        "or pass trust=True; or save hyperparameters as plain numbers/strings.",
        unsafe_globals=names,
    )


def state_dict_of(checkpoint: Mapping[str, Any], path: PathLike,
                  key: str = "state_dict") -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint[key]`` (a Lightning checkpoint) or of a bare state_dict.

    Raises:
        CheckpointLoadError: no ``key`` entry and not a bare mapping of tensors.
    """
    state = checkpoint.get(key)
    if state is None and checkpoint and all(isinstance(v, torch.Tensor)
                                            for v in checkpoint.values()):
        state = checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointLoadError(path, f"not a checkpoint (no '{key}' entry; top-level keys: "
                                  f"{sorted(checkpoint)[:10]})",
                                  "Give a Lightning checkpoint or a saved state_dict.")
    return dict(state)


def check_state_dict(module: nn.Module, state: Mapping[str, Any], path: PathLike) -> None:
    """Raise unless ``state`` has exactly the keys and shapes of ``module.state_dict()``.

    Raises:
        CheckpointLoadError: listing every missing key, unexpected key and shape mismatch.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    if mismatched:
        parts.append("shape mismatches " + ", ".join(
            f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched))
    raise CheckpointLoadError(
        path, f"it does not match {type(module).__name__}: " + "; ".join(parts),
        "Build the model with the architecture and hyperparameters it was trained with.",
        missing=missing, unexpected=unexpected, mismatched=mismatched,
    )


def module_from_checkpoint(module_class: type[nn.Module], checkpoint: Mapping[str, Any],
                           path: PathLike, **kwargs: Any) -> nn.Module:
    """Build ``module_class`` from the checkpoint's hyperparameters (overridden by ``kwargs``).

    Only the hyperparameters ``module_class.__init__`` accepts are passed, as Lightning does.
    The weights are not loaded here.
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    params = inspect.signature(module_class.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    hparams.update(kwargs)
    try:
        return module_class(**hparams)
    except TypeError as err:
        raise CheckpointLoadError(path, f"{module_class.__name__}(**{hparams}) failed: {err}",
                                  "Pass the missing constructor arguments as keyword arguments."
                                  ) from err
