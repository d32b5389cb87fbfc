"""Finding the train/validation loss and accuracy among the metrics a module logged, by the
names people actually use.

A logged name is split into words at ``/``, ``_``, ``.``, ``-`` and spaces and matched on its
words, so ``val_loss``, ``val/loss``, ``valid_loss``, ``validation/loss_epoch`` and
``loss/val`` are all the validation loss, and ``train_acc``, ``train/accuracy`` and
``training_accuracy_epoch`` are all the training accuracy. A name with any other word
(``val_loss_ema``, ``val/acc_top5``) is a different metric and is never taken. Lightning's
``_step`` variants are never read: the curves are per epoch.

Example:
    >>> logged = ["train/loss_step", "train/loss_epoch", "val/loss", "val/acc", "val/acc_ema"]
    >>> [find_metric(logged, role) for role in ROLES]
    ['train/loss_epoch', 'val/loss', None, 'val/acc']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["DESCRIPTIONS", "ROLES", "MetricKeys", "find_metric", "find_metrics"]

#: The metrics the curves and the advisor read, as ``<stage>_<quantity>``.
ROLES = ("train_loss", "val_loss", "train_acc", "val_acc")
#: Each role in words, for messages.
DESCRIPTIONS = {"train_loss": "training loss", "val_loss": "validation loss",
                "train_acc": "training accuracy", "val_acc": "validation accuracy"}

_STAGES = {
    "train": {"train", "training", "trn"},
    "val": {"val", "valid", "validation", "eval", "dev"},
}
_QUANTITIES = {
    "loss": {"loss"},
    "acc": {"acc", "accuracy", "top1", "acc1"},
}
_SPLIT = re.compile(r"[/_.\-\s]+")


def _words(name: str) -> list[str]:
    return [w for w in _SPLIT.split(name.lower()) if w]


def _rank(name: str, role: str) -> int | None:
    """How well ``name`` fits ``role``: lower is better, None when it is another metric."""
    stage, quantity = role.split("_")
    words = _words(name)
    suffix = 0
    if words and words[-1] == "epoch":
        words, suffix = words[:-1], 1
    elif words and words[-1] == "step":
        return None
    if len(words) != 2:
        return None
    first, second = words
    if first in _STAGES[stage] and second in _QUANTITIES[quantity]:
        order = 0
    elif second in _STAGES[stage] and first in _QUANTITIES[quantity]:
        order = 1
    else:
        return None
    # The canonical spelling first, then the plain name before its ``_epoch`` twin.
    return (0 if name == role else 2 + order) * 2 + suffix


def find_metric(logged: Iterable[str], role: str) -> str | None:
    """The logged name that holds ``role`` (one of :data:`ROLES`), or None.

    Example:
        >>> find_metric(["valid_accuracy_epoch", "valid_accuracy_step"], "val_acc")
        'valid_accuracy_epoch'
        >>> find_metric(["val_loss"], "train_loss") is None
        True
    """
    if role not in ROLES:
        raise ValueError(f"`role` must be one of {list(ROLES)}, got {role!r}.")
    ranked = sorted((rank, name) for name in logged
                    if (rank := _rank(name, role)) is not None)
    return ranked[0][1] if ranked else None


def find_metrics(logged: Iterable[str]) -> dict[str, str]:
    """Every role of :data:`ROLES` found among ``logged``, mapped to the name that holds it.

    Example:
        >>> find_metrics(["loss/train", "loss/valid"])
        {'train_loss': 'loss/train', 'val_loss': 'loss/valid'}
    """
    names = list(logged)
    found = {role: find_metric(names, role) for role in ROLES}
    return {role: name for role, name in found.items() if name is not None}


class MetricKeys:
    """The logged name each role is read from: the name the user gave, else the one
    :func:`find_metric` finds. A name is pinned once found, so a curve never changes source.

    Args:
        explicit: Role -> the name the user passed, or None to find it by convention.

    Example:
        >>> keys = MetricKeys({"train_loss": None, "val_loss": None, "val_acc": "valid/top1"})
        >>> keys.resolve(["train/loss_epoch", "train/loss_step", "valid/top1", "val/acc"])
        {'train_loss': 'train/loss_epoch', 'val_acc': 'valid/top1'}
        >>> keys.missing_roles(["train_loss", "val_loss", "val_acc"])
        ['val_loss']
        >>> keys.describe(["val_acc"])
        '`valid/top1` as the validation accuracy (given)'
    """

    def __init__(self, explicit: Mapping[str, str | None]) -> None:
        unknown = [role for role in explicit if role not in ROLES]
        if unknown:
            raise ValueError(f"Roles must be among {list(ROLES)}, got {unknown}.")
        self.explicit = dict(explicit)
        self.used: dict[str, str] = {}

    def resolve(self, logged: Iterable[str], roles: Iterable[str] | None = None
                ) -> dict[str, str]:
        """Pin a logged name for each of ``roles`` (default: every role) that has none yet.

        A given name is found as itself or as its ``<name>_epoch`` twin (logged with
        ``on_step=True, on_epoch=True``). Returns the names pinned by this call.
        """
        names = list(logged)
        new: dict[str, str] = {}
        for role in self.explicit if roles is None else roles:
            if role in self.used:
                continue
            given = self.explicit[role]
            if given is None:
                name = find_metric(names, role)
            else:
                name = next((n for n in (given, f"{given}_epoch") if n in names), None)
            if name is not None:
                self.used[role] = new[role] = name
        return new

    def missing_roles(self, roles: Iterable[str]) -> list[str]:
        """Those of ``roles`` with no logged name pinned."""
        return [role for role in roles if role not in self.used]

    def describe(self, roles: Iterable[str]) -> str:
        """``roles``' pinned names in words, for a finding's message."""
        return ", ".join(
            f"`{self.used[role]}` as the {DESCRIPTIONS[role]} "
            f"({'given' if self.explicit[role] else 'found by its name'})"
            for role in roles if role in self.used)
