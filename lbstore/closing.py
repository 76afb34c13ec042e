"""A base for objects that own open files: `with obj:` closes them on every path."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class Closing(abc.ABC):
    """Context-manager protocol for classes whose `close()` releases what they hold."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource; safe to call more than once."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
