"""lbqemu: the QEMU side (QMP, dirty bitmaps, fleecing, NBD pull). Knows nothing of the store."""
