"""The `tokenrelay` command line: argument parsing (`parser`) and the commands (`commands`)."""

from tokenrelay.cli.parser import main

__all__ = ["main"]
