"""The `fxassets` command line (main.py: `stage`, `report`, and the apply, bench, detect and generate-sources
subcommands)."""

from fxassets.cli.main import main

__all__ = ["main"]
