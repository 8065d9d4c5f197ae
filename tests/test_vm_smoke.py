"""A real guest boots, runs the agent from this repo's .venv, and sees a vCPU hot-plugged.

These check the VM harness itself (tests/vm) end to end; the agent and broker
tests on real guests build on it. Each test boots its own TCG guest (about 4.5 s
to its script here, plus about 12 s for a Python import).
"""

from __future__ import annotations

import pytest
from vm.harness import BOOT_TIMEOUT_SECONDS, VENV_BIN, VMs

pytestmark = pytest.mark.vm

MiB = 1 << 20
# `vmtide-agent status` imports the agent (about 12 s under TCG here) and samples
# the CPU twice, 0.5 s apart; five times that for a slow CI host.
AGENT_STATUS_TIMEOUT_SECONDS = 90.0
# ACPI hotplug reaches the guest's sysfs well within a second of device_add.
CPU_HOTPLUG_TIMEOUT_SECONDS = 20.0


async def test_agent_status_in_a_real_guest(vms: VMs) -> None:
    vm = vms.new()
    await vm.start(f"""
        {VENV_BIN}/vmtide-agent status --json > /tmp/status.json
        publish status.json < /tmp/status.json
    """)

    status = await vm.read_json("status.json", AGENT_STATUS_TIMEOUT_SECONDS)

    assert status["cpus"]["online"] == 1, vm.explain(f"cpus: {status['cpus']}")
    assert status["cpus"]["possible"] == 4, vm.explain(f"cpus: {status['cpus']}")
    assert status["memory"]["block_size_bytes"] == 128 * MiB
    assert await vm.wait_exit() == 0


async def test_hot_plugged_vcpu_appears_offline_and_comes_online(vms: VMs) -> None:
    vm = vms.new()
    cpu1 = "/sys/devices/system/cpu/cpu1"
    await vm.start(f"""
        echo | publish ready
        while [ ! -e {cpu1}/online ]; do sleep 0.05; done
        publish cpu1-online < {cpu1}/online
        echo 1 > {cpu1}/online
        publish cpus-online < /sys/devices/system/cpu/online
    """)
    # Plug only once the guest runs, so this is a hotplug and not a boot-time CPU.
    await vm.wait_for("ready", BOOT_TIMEOUT_SECONDS)

    async with vm.qmp() as qmp:
        await qmp.execute(
            "device_add",
            {
                "driver": "max-x86_64-cpu",
                "id": "cpu1",
                "socket-id": 0,
                "core-id": 1,
                "thread-id": 0,
            },
        )

    # The kernel leaves a hot-added CPU offline: onlining it is userspace's job.
    assert (await vm.read_text("cpu1-online", CPU_HOTPLUG_TIMEOUT_SECONDS)).strip() == "0"
    assert (await vm.read_text("cpus-online", CPU_HOTPLUG_TIMEOUT_SECONDS)).strip() == "0-1"
    assert await vm.wait_exit() == 0
