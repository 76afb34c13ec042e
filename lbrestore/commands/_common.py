"""Helpers shared by command modules: the opened store, --json, human sizes and ages."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from lbrestore.errors import UsageError
from lbstore.store import Store

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_LOCK_TIMEOUT = 10.0
LOCK_TIMEOUT_ENV = "LBRESTORE_LOCK_TIMEOUT"


def lock_timeout() -> float:
    """Seconds a writer waits for the store lock: $LBRESTORE_LOCK_TIMEOUT, else 10."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:  # nan would wait forever, inf as well
        raise UsageError(f"{LOCK_TIMEOUT_ENV}={raw!r}: expected a finite number of seconds >= 0")
    return value


class FiniteFloat(click.FloatRange):
    """A float option within bounds that also refuses nan and inf (which pass FloatRange:
    every comparison with nan is false) before they reach code that needs a number."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def with_store(*, write: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Open the store from --store / $LBRESTORE_STORE for the command and close it on every path.

    The command receives the opened Store as its first argument; `write=True` takes the lock
    (and recovers), so the command never manages the store's lifetime.
    """

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            path = ctx.find_root().obj["store_path"]
            purpose = f"lbrestore {ctx.info_name or ctx.command.name}"
            vm = kwargs.get("vm") if write else None  # a VM's writer locks that VM only
            with Store.open(
                path, write=write, lock_timeout=lock_timeout(), purpose=purpose, vm=vm
            ) as store:
                result = func(store, *args, **kwargs)
            for warning in store.warnings:  # e.g. a checkpoint an old reader kept partial
                click.echo(f"lbrestore: warning: {warning}", err=True)
            return result

        return wrapper

    return decorator


def json_option(func: F) -> F:
    """Add `--json` (keyword `as_json`): machine-readable output instead of the human one."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(func)


def echo_json(value: Any) -> None:
    """Print `value` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def format_age(moment: datetime, now: datetime | None = None) -> str:
    """How long ago `moment` was, in its largest unit: "just now", "5m ago", "2h ago", "3d ago"."""
    now = now or datetime.now(UTC)
    seconds = int((now - moment).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 10:
        return "just now"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{seconds // size}{unit}"
            return f"in {amount}" if future else f"{amount} ago"
    return "just now"  # pragma: no cover - seconds >= 10 always matches a unit


def format_size(size: int) -> str:
    """A byte count for people: 512 B, 64.0 KiB, 1.5 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain, left-aligned text table (stable for scripts and tests, unlike rich)."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def is_terminal() -> bool:
    """True when stderr is a terminal (progress bars only then)."""
    return sys.stderr.isatty()
