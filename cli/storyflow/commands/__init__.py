"""The typer application. Each command lives in its own module and is imported lazily."""

from storyflow.commands.app import main

__all__ = ["main"]
