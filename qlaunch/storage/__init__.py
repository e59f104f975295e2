"""Disk images: qemu-img, SD cards, who holds an image."""
