"""Entry point: ``python -m gateway`` is the ``gateway`` command."""
from __future__ import annotations

from gateway.cli import cli

if __name__ == "__main__":  # pragma: no cover
    cli()
