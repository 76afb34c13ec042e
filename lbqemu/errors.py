"""Errors raised by lbqemu. Every class carries a stable exit code for the CLI."""

from __future__ import annotations


class QemuError(Exception):
    """Root of every error that lbqemu raises on purpose (exit code 1)."""

    exit_code = 1
