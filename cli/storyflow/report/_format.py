"""Figures for people, shared by the table, HTML and advice renderers."""

from __future__ import annotations

from storyflow.report._model import Usage
from storyflow.ui.lines import format_duration


def seconds(value: float | None) -> str:
    """A duration for people (``85ms``, ``1.6s``, ``2m05s``); ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 0.9995:
        return f"{max(value, 0.0) * 1000:.0f}ms"
    return format_duration(value)


def money(cost: float) -> str:
    """A cost: ``-`` for none, more digits for tiny amounts."""
    if cost <= 0:
        return "-"
    return f"{cost:.4f}" if cost < 1 else f"{cost:.2f}"


def tokens(usage: Usage) -> str:
    return f"{usage.tokens:,}" if usage.tokens else "-"


def counts(mapping: dict[str, int]) -> str:
    """``transient×2, timeout×1``; ``-`` for none."""
    return ", ".join(f"{k}×{v}" for k, v in sorted(mapping.items())) or "-"


def by_status(mapping: dict[str, int]) -> str:
    """``24 succeeded, 2 skipped``; ``none`` for none."""
    return ", ".join(f"{n:,} {s}" for s, n in sorted(mapping.items())) or "none"


def limit_name(queued: str) -> str:
    """``pool:llm`` → ``pool llm``; ``max_parallel`` → ``--max-parallel``."""
    if queued.startswith("pool:"):
        return f"pool {queued[5:]}"
    return "--max-parallel" if queued == "max_parallel" else queued
