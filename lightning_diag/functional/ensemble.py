"""How an ensemble combines its members' outputs (recipe step 7).

Example:
    >>> import torch
    >>> from lightning_diag.functional.ensemble import combine_logits
    >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # 2 members, 1 sample, 2 classes
    >>> combine_logits(logits, "vote").tolist()
    [[0.5, 0.5]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COMBINE", "combine_logits", "ensemble_log_probs"]

COMBINE = ("mean_prob", "mean_logit", "vote")


def combine_logits(logits: torch.Tensor, combine: str = "mean_prob") -> torch.Tensor:
    """Combine members' logits ``(K, N, C)`` into one ``(N, C)`` output.

    ``"mean_prob"``: the mean of the members' softmax probabilities (a probability vector);
    ``"mean_logit"``: the mean of the logits (logits); ``"vote"``: the fraction of members whose
    argmax is each class (ties go to the lowest class index under ``argmax``).
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be (members, batch, classes), got {tuple(logits.shape)}.")
    if combine == "mean_prob":
        return logits.float().softmax(dim=-1).mean(0)
    if combine == "mean_logit":
        return logits.mean(0)
    if combine == "vote":
        votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return votes.mean(0)
    raise ValueError(f"`combine` must be one of {COMBINE}, got {combine!r}.")


def ensemble_log_probs(combined: torch.Tensor, combine: str) -> torch.Tensor:
    """Log-probabilities of a combined output, for a cross-entropy (NLL) of the ensemble."""
    if combine == "mean_logit":
        return combined.log_softmax(-1)
    return combined.clamp_min(1e-12).log()
