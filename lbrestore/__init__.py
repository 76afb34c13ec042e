"""lbrestore: the application joining lbqemu and lbstore (CLI, backup job, restore, boot test)."""

__version__ = "0.1.0"
