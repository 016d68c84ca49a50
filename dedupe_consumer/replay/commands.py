"""``dedupe-consumer record`` and ``replay`` (placeholders until issue 5 lands)."""

from __future__ import annotations

import typer


def record() -> None:
    """Record a topic to a JSON Lines file."""
    typer.echo("record is not built yet (issue 5)", err=True)
    raise typer.Exit(2)


def replay() -> None:
    """Replay a recording through a handler, or into a topic."""
    typer.echo("replay is not built yet (issue 5)", err=True)
    raise typer.Exit(2)
