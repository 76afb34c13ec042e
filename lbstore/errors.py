"""Errors raised by lbstore. Every class carries a stable exit code for the CLI."""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error that lbstore raises on purpose (exit code 1)."""

    exit_code = 1


class Qcow2Error(StoreError):
    """A qcow2 file is malformed, unsupported or cannot be read or written."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsupportedFeatureError(Qcow2Error):
    """A qcow2 file uses a feature this reader does not implement; names the feature."""

    def __init__(self, path: object, feature: str) -> None:
        super().__init__(path, f"unsupported qcow2 feature: {feature}")
        self.feature = feature
