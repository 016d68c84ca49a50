"""``dedupe-consumer sidecar`` (placeholder until issue 6 lands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def sidecar(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML settings file.")],
) -> None:
    """Consume, dedupe and POST each unique event to [sidecar].target_url."""
    typer.echo("sidecar mode is not built yet (issue 6)", err=True)
    raise typer.Exit(2)
