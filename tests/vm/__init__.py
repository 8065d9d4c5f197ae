"""Boot a real Linux guest under QEMU for tests: `vm.build_image` and `vm.harness`."""
