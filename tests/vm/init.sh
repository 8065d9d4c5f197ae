#!/bin/busybox sh
# PID 1 of the vmtide test guest (built into the initramfs by build_image.py).
#
# Loads the virtio, 9p and network modules, brings up user networking, mounts
# the host's root read-only over 9p and chroots into it, so the host's Python and
# the project's .venv run unchanged. Kernel command line:
#   vmtide.run=PATH    program to run inside the chroot (absolute host path)
#   vmtide.share=PATH  host directory exported read-write as "vmshare"; mounted
#                      at the same path, so the guest writes results there
# Output goes to the serial console. Powers off when the program ends.

/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "vmtide-init: $*"; }

halt() {
    sync
    poweroff -f
    # Only reached if the reboot syscall failed.
    echo o > /proc/sysrq-trigger
}

fail() {
    say "FAILED: $*"
    halt
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# note NAME VALUE: write VALUE to the share atomically; the host polls for NAME.
note() {
    echo "$2" > "/newroot$SHARE/.$1.partial"
    mv "/newroot$SHARE/.$1.partial" "/newroot$SHARE/$1"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for module in $(cat /etc/vmtide/modules); do
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done

RUN=
SHARE=
KEEP=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtide.run=*) RUN="${arg#vmtide.run=}" ;;
        vmtide.share=*) SHARE="${arg#vmtide.share=}" ;;
        vmtide.keep=*) KEEP="$KEEP ${arg#vmtide.keep=}" ;;
    esac
done
[ -n "$RUN" ] || fail "no vmtide.run= on the kernel command line"

# QEMU user networking: the host's 127.0.0.1:PORT is 10.0.2.2:PORT from here.
ip link set lo up
ip link set eth0 up || fail "no eth0 (virtio_net)"
ip addr add 10.0.2.15/24 dev eth0 || fail "eth0 address"
ip route add default via 10.0.2.2 || fail "default route"

NINEP=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /newroot
mount -t 9p -o "$NINEP,ro" hostroot /newroot || fail "mount hostroot over 9p"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
# The guest's own /tmp and /run hide the host's; host paths the guest needs
# from under them (a checkout and its .venv in /tmp, as CI may have) are
# set aside first and bound back on top.
n=0
for path in $KEEP; do
    mkdir -p "/keep/$n"
    mount -o bind "/newroot$path" "/keep/$n" || fail "keep $path"
    n=$((n + 1))
done
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
n=0
for path in $KEEP; do
    mkdir -p "/newroot$path"
    mount -o bind "/keep/$n" "/newroot$path" || fail "bind $path back"
    n=$((n + 1))
done
if [ -n "$SHARE" ]; then
    # The share usually lives under /tmp, now the guest's own tmpfs: make the
    # mount point there (a no-op when the host root already has it).
    mkdir -p "/newroot$SHARE" 2>/dev/null
    mount -t 9p -o "$NINEP" vmshare "/newroot$SHARE" || fail "mount vmshare over 9p"
    note .vmtide-started "$(uptime_s)"
fi

say "running $RUN at $(uptime_s) s"
HOME=/tmp VMTIDE_SHARE="$SHARE" PYTHONDONTWRITEBYTECODE=1 chroot /newroot "$RUN"
status=$?
say "$RUN exited with $status at $(uptime_s) s"
[ -n "$SHARE" ] && note .vmtide-exit "$status"
halt
