"""The self-contained HTML report of one run or a tree of runs.

Example:
    >>> from lightning_diag.report import build_report
    >>> callable(build_report)
    True
"""

from lightning_diag.report.build import build_report

__all__ = ["build_report"]
