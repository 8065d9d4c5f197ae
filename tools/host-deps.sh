#!/usr/bin/env bash
# Install the Debian packages vmtide's demo and tests need on the host, when
# they are missing. One list for `make demo`, `make test` and CI (.ci/run).
#   qemu-system-x86: the real-VM demo and tests, and the QMP backend tests
#   busybox-static:  the initramfs of the test guest (tests/vm)
#   stress-ng:       memory pressure inside the test guest (it runs the host's
#                    root over 9p, so the host's stress-ng is the guest's)
#   systemd:         systemd-analyze verifies the units
#   prometheus:      a real server scrapes both daemons; promtool checks rules
#   dpkg-dev, lintian, mmdebstrap, rpm, cpio: `make packages` and its tests
#       (build the .debs and .rpms, lint them, install into a clean Debian root)
#
# QEMU comes from bookworm-backports on Debian 12: QEMU 7.2 under TCG frees a
# vCPU's jump cache while other vCPU threads still use it (fixed upstream by
# 4731f89b3b, "cpu: free cpu->tb_jmp_cache with RCU", in 8.0), so a vCPU
# unplug corrupts its heap and a later hot-plug aborts it. KVM hosts are not
# affected; the tests run under TCG.
set -euo pipefail

packages=(make python3 python3-venv python3-dev busybox-static stress-ng systemd prometheus
    dpkg-dev lintian mmdebstrap rpm cpio)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu=$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null || true)
case "$qemu" in
    "install ok installed 1:"[89]* | "install ok installed 1:"[1-9][0-9]*) need_qemu=0 ;;
    *) need_qemu=1 ;;
esac
[ ${#missing[@]} -eq 0 ] && [ "$need_qemu" = 0 ] && exit 0

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    [ "$need_qemu" = 1 ] && missing+=("qemu-system-x86 (8.0 or later)")
    echo "vmtide: missing Debian packages: ${missing[*]}" >&2
    echo "vmtide: install them as root (on Debian 12, QEMU from bookworm-backports:" \
        "apt-get install -t bookworm-backports qemu-system-x86)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
qemu_from=()
if [ "$need_qemu" = 1 ] && [ "$codename" = bookworm ]; then
    list=/etc/apt/sources.list.d/vmtide-bookworm-backports.sources
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "vmtide: adding bookworm-backports for QEMU ($list)" >&2
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" \
            "Suites: bookworm-backports" "Components: main" \
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$list"
    fi
    qemu_from=(-t bookworm-backports)
fi
echo "vmtide: installing ${missing[*]} $([ "$need_qemu" = 1 ] && echo qemu-system-x86) (apt-get)" >&2
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$need_qemu" = 1 ]; then
    apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" qemu-system-x86 >/dev/null
fi
