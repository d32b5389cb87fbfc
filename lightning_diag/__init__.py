"""lightning_diag: the "babysit your network" training recipe as PyTorch Lightning callbacks."""

from lightning_diag.base import DiagnosticCallback, findings
from lightning_diag.findings import DiagnosticError, DiagnosticWarning, Finding, Severity

__version__ = "0.1.0"

__all__ = [
    "DiagnosticCallback",
    "DiagnosticError",
    "DiagnosticWarning",
    "Finding",
    "Severity",
    "findings",
]
