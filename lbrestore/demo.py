"""The README's main job: a short demonstration of lbrestore on this machine."""

from __future__ import annotations

from lbrestore.cli import main

if __name__ == "__main__":
    main(["--help"])
