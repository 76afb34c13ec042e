"""VM and disk names: checked before any name becomes part of a path.

A name is 1-64 characters of `[A-Za-z0-9._-]` starting with a letter or digit, so it can never be
empty, `.`/`..`, hidden, contain a slash, or grow a path beyond the filesystem's limits.
"""

from __future__ import annotations

import re

from lbstore.errors import InvalidNameError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_name(name: object) -> bool:
    """True when `name` may be used as a VM or disk name."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_name(what: str, name: object) -> str:
    """Return `name` when valid, else raise InvalidNameError naming `what` ("VM" or "disk")."""
    if not is_valid_name(name):
        raise InvalidNameError(what, str(name))
    assert isinstance(name, str)
    return name


def check_vm_name(name: object) -> str:
    """A valid VM name, or InvalidNameError."""
    return check_name("VM", name)


def check_disk_name(name: object) -> str:
    """A valid disk name, or InvalidNameError."""
    return check_name("disk", name)
