"""Errors raised by lbfuse. Every class carries a stable exit code for the CLI."""

from __future__ import annotations


class FuseError(Exception):
    """Root of every error that lbfuse raises on purpose (exit code 1)."""

    exit_code = 1
