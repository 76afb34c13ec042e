"""What is inside a guest disk, read in user space (partitions, LVM, filesystems)."""
