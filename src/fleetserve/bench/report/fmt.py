"""How figures read in the console, compare and HTML renderers: one place for units."""

from __future__ import annotations


def ms(value_s: float | None) -> str:
    """Seconds as milliseconds, with three significant digits or so; '-' when unknown."""
    if value_s is None:
        return "-"
    value = value_s * 1e3
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def frac(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
