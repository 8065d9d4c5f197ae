"""End to end on a real VM: the agent inside a Linux guest under QEMU, the broker
outside driving QEMU over QMP. No fake in the loop but the emulated hardware.

The rig (`vm.rig`) starts the agent in each guest and drives its load through
the shared directory; the tests read what the guest's kernel shows and the
broker's books.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from vm.harness import VMOptions, VMs
from vm.rig import (
    AGENT_CONFIG,
    AGENT_CONNECT_TIMEOUT_SECONDS,
    GROW_TIMEOUT_SECONDS,
    SHRINK_TIMEOUT_SECONDS,
    GiB,
    ListHandler,
    MiB,
    Rig,
    Setup,
    booted,
    plugged_vcpus,
    rig,
)

from broker.config import PoolConfig

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


async def test_cpus_follow_load_in_a_real_guest(vms: VMs, tmp_path: Path) -> None:
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    async with booted(vms, tmp_path, VMOptions(), pool) as setup:
        assert setup.guest_cpus() == {0}
        setup.load(cpus=3)
        # The agent asks, the broker hot-plugs over QMP, the agent onlines.
        await setup.until(lambda: len(setup.guest_cpus()) >= 2, GROW_TIMEOUT_SECONDS, "cpus up")
        await setup.until(
            lambda: setup.state().get("online", {}).get("cpus", 0) >= 2, 10, "broker sees them"
        )
        assert await plugged_vcpus(setup.vm) >= 2
        # Load stops: after the window the agent offlines, acknowledges, and
        # the broker unplugs exactly those vCPUs (QEMU confirms the removal).
        setup.load(cpus=0)
        await setup.until(lambda: setup.guest_cpus() == {0}, SHRINK_TIMEOUT_SECONDS, "cpus down")
        await setup.until(
            lambda: any("unplugged cpus [" in line for line in setup.broker_log),
            30,
            "the broker to unplug them",
        )
        deadline = time.monotonic() + 30
        while await plugged_vcpus(setup.vm) != 1:
            assert time.monotonic() < deadline, setup.vm.explain("vCPUs still plugged")
            await asyncio.sleep(0.5)
        await setup.until(lambda: setup.state()["online"]["cpus"] == 1, 10, "books match")
        # Under TCG QEMU realizes at most maxcpus (4) vCPUs over its life; one
        # at boot and at least one plugged above, so growing to four again
        # runs out: the broker refuses the hot-plug instead of letting QEMU
        # abort, and the guest runs on.
        setup.load(cpus=3)
        await setup.until(
            lambda: any("under TCG" in line for line in setup.broker_log),
            GROW_TIMEOUT_SECONDS,
            "the broker to refuse a vCPU TCG cannot realize",
        )
        assert setup.vm.script_status() is None
        assert await plugged_vcpus(setup.vm) < 4  # QMP answers: QEMU is alive


@pytest.mark.parametrize(
    "options",
    [VMOptions(virtio_mem="2G"), VMOptions()],
    ids=["virtio-mem", "pc-dimm"],
)
async def test_memory_follows_pressure_in_a_real_guest(
    vms: VMs, tmp_path: Path, options: VMOptions
) -> None:
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    async with booted(vms, tmp_path, options, pool) as setup:
        boot_total, boot_blocks = setup.mem_total(), setup.blocks()
        assert boot_total > 0 and boot_blocks > 0
        # Memory pressure rises: memory arrives, goes online movable, MemTotal grows.
        setup.load(memory_mib=800)
        await setup.until(
            lambda: setup.mem_total() >= boot_total + 256 * MiB,
            GROW_TIMEOUT_SECONDS,
            "MemTotal to grow",
        )
        agent_log = (setup.vm.share / "agent.log").read_text()
        assert "online memory" in agent_log and ": done" in agent_log
        # Every block beyond the boot memory went online in ZONE_MOVABLE.
        hot_online = setup.online_blocks() - boot_blocks
        assert hot_online > 0 and setup.movable_blocks() >= hot_online, setup.vm.explain(
            f"{setup.movable_blocks()} movable of {hot_online} hot-added blocks online"
        )
        # The broker hears of it in the grant's Ack and writes its state file
        # at most once a second: wait for it rather than race it.
        await setup.until(
            lambda: setup.state()["online"]["memory_bytes"] >= 1 * GiB + 256 * MiB,
            30,
            "the broker to count the memory online",
        )
        grown = setup.state()["online"]["memory_bytes"]
        # Pressure ends: blocks that offline are unplugged, refusals are
        # reported, and the broker's books match the guest.
        setup.load(memory_mib=0)
        await setup.until(
            lambda: setup.state().get("online", {}).get("memory_bytes", grown) < grown,
            SHRINK_TIMEOUT_SECONDS,
            "memory to be given back",
        )
        await setup.until(
            lambda: setup.blocks() < boot_blocks + (grown - 1 * GiB) // (128 * MiB),
            60,
            "the freed blocks to be unplugged",
        )
        await setup.until(
            lambda: (
                not setup.state()["pending_reclaims"]
                and setup.state()["online"]["memory_bytes"] == setup.online_blocks() * 128 * MiB
            ),
            30,
            "the broker's books to match the guest's online blocks",
        )
        final = setup.state()["online"]["memory_bytes"]
        assert final >= 1 * GiB  # never below the minimum
        assert setup.mem_total() <= boot_total + (final - 1 * GiB) + 64 * MiB


def shared(setup: Setup, name: str) -> str:
    """A file the guest writes in its share, or "" before it exists."""
    path = setup.vm.share / name
    return path.read_text(errors="replace") if path.exists() else ""


async def test_a_block_the_kernel_will_not_offline_is_reported_not_lost(
    vms: VMs, tmp_path: Path
) -> None:
    # Pages the kernel cannot migrate (held by pipes, tests/vm/pin_pages.py)
    # keep a hot-added block from going offline: the kernel retries until the
    # agent's deadline interrupts it. The block must be reported, stay in the
    # books, and go back once the pages are free.
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    config = AGENT_CONFIG + "[memory]\noffline_timeout_seconds = 3.0\n"
    made = Rig(tmp_path, pool)
    with ListHandler(made.log):
        setup = await made.add(vms, "vm1", VMOptions(virtio_mem="2G"), agent_config=config)
        made.start_broker()
        try:
            await made.connected()
            boot_total, boot_blocks = setup.mem_total(), setup.blocks()
            setup.load(memory_mib=800)
            await setup.until(
                lambda: setup.mem_total() >= boot_total + 256 * MiB,
                GROW_TIMEOUT_SECONDS,
                "MemTotal to grow",
            )
            # Movable allocations come from ZONE_MOVABLE first: the hot-added blocks.
            setup.load(pinned_mib=96)
            await setup.until(
                lambda: "pinned 96 MiB" in shared(setup, "pin.log"),
                60,
                "96 MiB pinned",
            )
            setup.load(memory_mib=0)

            def refused() -> list[str]:
                log = shared(setup, "agent.log")
                return [
                    line
                    for line in log.splitlines()
                    if "offline memory" in line and ("timed_out" in line or "refused" in line)
                ]

            await setup.until(lambda: bool(refused()), SHRINK_TIMEOUT_SECONDS, "a refusal")
            # What went offline was unplugged; what did not stays, counted.
            await setup.until(
                lambda: (
                    not setup.state()["pending_reclaims"]
                    and setup.state()["online"]["memory_bytes"] == setup.online_blocks() * 128 * MiB
                ),
                60,
                "the broker's books to match the guest's online blocks",
            )
            held = setup.online_blocks()
            assert held > boot_blocks, "the pinned block went offline: nothing was refused"
            # Still counted: the pool holds every block the guest kept.
            assert setup.pool()["allocated"]["memory_bytes"] >= held * 128 * MiB
            # The pages are freed: the next reclaim takes the rest back.
            setup.load(pinned_mib=0)
            await setup.until(
                lambda: (
                    setup.online_blocks() == boot_blocks
                    and setup.state()["online"]["memory_bytes"] == boot_blocks * 128 * MiB
                ),
                SHRINK_TIMEOUT_SECONDS + 60,
                "the refused blocks to be given back once free",
            )
        finally:
            (setup.vm.share / "stop").touch()
            await made.stop_broker()


async def test_broker_restart_and_agent_sigkill_reconverge(vms: VMs, tmp_path: Path) -> None:
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    # Eight vCPU slots for a guest limited to four: under TCG QEMU realizes
    # at most maxcpus vCPUs over its life, and this test plugs again after unplugs.
    async with rig(vms, tmp_path, pool, [("vm1", VMOptions(maxcpus=8), 0)]) as made:
        setup = made.guests["vm1"]
        setup.load(cpus=3)
        await setup.until(lambda: len(setup.guest_cpus()) >= 2, GROW_TIMEOUT_SECONDS, "cpus up")
        held = setup.guest_cpus()
        # The broker restarts mid-session: the guest keeps what it has, the
        # new broker's books come from the guest's Hello.
        await made.stop_broker()
        made.start_broker()
        await setup.until(lambda: setup.state().get("connected", False), 60, "reconnected")
        assert setup.guest_cpus() >= held
        await setup.until(
            lambda: setup.state()["online"]["cpus"] == len(setup.guest_cpus()),
            30,
            "the new broker's books to match the guest",
        )
        # The agent dies by SIGKILL and comes back: it rebuilds from sysfs and
        # the broker, and nothing granted is lost or counted twice.
        before = setup.guest_cpus()

        def sessions() -> int:
            return sum("guest vm1: session " in line for line in made.log)

        opened = sessions()
        (setup.vm.share / "kill-agent").touch()
        await setup.until(
            lambda: "killed with SIGKILL" in (setup.vm.share / "agent.log").read_text(),
            30,
            "the agent to be killed",
        )
        await setup.until(
            lambda: sessions() > opened and setup.state().get("connected", False),
            AGENT_CONNECT_TIMEOUT_SECONDS,
            "the restarted agent to connect",
        )
        assert setup.guest_cpus() >= before
        await setup.until(
            lambda: (
                setup.state()["online"]["cpus"] == len(setup.guest_cpus())
                and setup.pool()["allocated"]["cpus"] <= 4
            ),
            30,
            "the books to reconverge",
        )
        # The load goes: the restarted agent gives back what it no longer needs.
        setup.load(cpus=0)
        await setup.until(lambda: setup.guest_cpus() == {0}, SHRINK_TIMEOUT_SECONDS, "cpus down")
        await setup.until(
            lambda: setup.state()["online"]["cpus"] == 1 and setup.pool()["allocated"]["cpus"] == 1,
            30,
            "the books to follow: one CPU online, one allocated",
        )


async def test_two_guests_compete_and_priority_wins(vms: VMs, tmp_path: Path) -> None:
    # Three CPUs for two guests: their minimums take two, one is surplus.
    pool = PoolConfig(cpus=3, memory_bytes=8 * GiB)
    guests = [("high", VMOptions(maxcpus=8), 10), ("low", VMOptions(maxcpus=8), 0)]
    async with rig(vms, tmp_path, pool, guests) as made:
        high, low = made.guests["high"], made.guests["low"]

        # Start from rest: an agent starting under TCG looks like load to its
        # own guest, and a guest that grew for it first keeps the surplus
        # until its shrink window has passed. Both agents connected, granted
        # their minimum and asking for no more, not only one CPU online before
        # their first request.
        def at_rest(setup: Setup) -> bool:
            state = setup.state()
            return (
                setup.guest_cpus() == {0}
                and state["connected"]
                and state["granted"]["cpus"] == 1
                and state["requested"]["cpus"] <= 1
            )

        await high.until(
            lambda: at_rest(high) and at_rest(low), SHRINK_TIMEOUT_SECONDS, "both guests at rest"
        )
        low.load(cpus=2)
        await low.until(lambda: len(low.guest_cpus()) == 2, GROW_TIMEOUT_SECONDS, "low grows")
        high.load(cpus=2)
        # The higher priority wins; the other is reclaimed down to its minimum.
        await high.until(
            lambda: len(high.guest_cpus()) == 2 and low.guest_cpus() == {0},
            SHRINK_TIMEOUT_SECONDS,
            "high to take the surplus from low",
        )
        await high.until(
            lambda: (
                high.pool()["allocated"]["cpus"] <= 3
                and low.state()["online"]["cpus"] == 1
                and high.state()["online"]["cpus"] == 2
            ),
            30,
            "the books to match both guests",
        )
