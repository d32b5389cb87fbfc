"""``python -m lightning_diag`` runs the ``lightning-diag`` command."""

from lightning_diag.cli import main

raise SystemExit(main())
