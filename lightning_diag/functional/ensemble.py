"""How an ensemble combines its members' predictions (recipe step 7), for any task.

Predictions are averaged where an average means something: class (or label) probabilities for
classification scores, the outputs themselves for regression. The result is handed back in the
kind of scores the members give (:meth:`~lightning_diag.functional.task.Task.from_probabilities`),
so that it goes through the user's own loss and metrics: logits in, the log of the mean
probability out (valid logits: ``softmax(log p) = p``); log-probabilities in, log-probabilities
out; probabilities in, probabilities out.

Example:
    >>> import torch
    >>> from lightning_diag.functional.task import Task
    >>> task = Task("multiclass", "logits", num_classes=2, class_dim=1)
    >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # 2 members, 1 sample, 2 classes
    >>> combine_outputs(logits, task, "vote").exp().tolist()
    [[0.5, 0.5]]
    >>> combine_outputs(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), Task("regression", "values"))
    tensor([2., 4.])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_diag.functional.task import Task

__all__ = ["COMBINE", "combine_outputs"]

COMBINE = ("mean_prob", "mean_logit", "vote")


def combine_outputs(outputs: torch.Tensor, task: Task, combine: str = "mean_prob"
                    ) -> torch.Tensor:
    """Combine ``K`` members' predictions stacked as ``(K, *shape)`` into one of ``shape``.

    ``"mean_prob"``: the mean of the members' probabilities (classification), of their outputs
    (any other task). ``"mean_logit"``: the mean of the outputs as they are. ``"vote"``: the
    fraction of members predicting each class (argmax over the class dimension) or each label
    (probability above 0.5); for a task that is no classification, the mean of the outputs.
    Classification results come back in the members' kind of scores (see the module docstring).

    Raises:
        ValueError: ``combine`` is not one of :data:`COMBINE`, or ``outputs`` holds no member.

    Example:
        >>> task = Task("multiclass", "probs", num_classes=2, class_dim=1)
        >>> combine_outputs(torch.tensor([[[0.25, 0.75]], [[0.75, 0.25]]]), task).tolist()
        [[0.5, 0.5]]
    """
    if combine not in COMBINE:
        raise ValueError(f"`combine` must be one of {COMBINE}, got {combine!r}.")
    if outputs.dim() < 1 or outputs.shape[0] == 0:
        raise ValueError(f"`outputs` must stack at least one member's prediction along "
                         f"dimension 0, got shape {tuple(outputs.shape)}.")
    if combine == "mean_logit" or not task.is_classification:
        return outputs.mean(0)
    like = outputs[0]
    if combine == "mean_prob":
        probs = torch.stack([task.to_probabilities(o) for o in outputs]).mean(0)
    elif task.kind == "multiclass":
        dim = task.class_dim if task.class_dim is not None else 1
        probs = torch.stack([_one_hot(o, dim, int(o.shape[dim])) for o in outputs]).mean(0)
    else:
        probs = torch.stack([(task.to_probabilities(o) > 0.5).float() for o in outputs]).mean(0)
    return task.from_probabilities(probs, like=like)


def _one_hot(scores: torch.Tensor, dim: int, classes: int) -> torch.Tensor:
    """1.0 at each sample's argmax over ``dim``, in the layout of ``scores``."""
    votes = F.one_hot(scores.argmax(dim), classes).float()  # the class dimension comes last
    return votes.movedim(-1, dim % scores.dim())
