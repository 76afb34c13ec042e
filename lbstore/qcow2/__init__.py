"""qcow2 reading and writing, following QEMU's docs/interop/qcow2.txt."""
