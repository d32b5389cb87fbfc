"""Trainer-free experiments that return :class:`~lightning_diag.findings.Finding` lists: the
data inspection (:mod:`.data`), the gradient check, the initial loss, the overfit test, the
learning-rate advisor's verdicts and the divergence report. The callbacks run them in a fit."""
