"""vmtide host broker: arbitrates host capacity among guests and drives QEMU."""
