"""lbstore: the restore-point store (qcow2 files plus a SQLite index). Knows nothing of QEMU."""
