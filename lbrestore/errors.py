"""Errors raised by the application layer, and the set of errors the CLI reports in one line."""

from __future__ import annotations

from lbfuse.errors import FuseError
from lbguest.errors import GuestError
from lbqemu.errors import QemuError
from lbstore.errors import StoreError


class AppError(Exception):
    """Root of every error the application layer raises on purpose (exit code 1)."""

    exit_code = 1


class UsageError(AppError):
    """The command line asks for something that cannot be done as asked (exit code 2)."""

    exit_code = 2


KNOWN_ERRORS: tuple[type[Exception], ...] = (AppError, StoreError, QemuError, FuseError, GuestError)
