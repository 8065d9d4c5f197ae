"""The real agent and the real broker on a simulated guest, end to end in one loop:
load rises, a request goes out, a grant comes back, CPUs and blocks go online;
load falls, a reclaim is acknowledged item by item and the broker unplugs
exactly the items the guest freed."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import pytest
from simulation import (
    LoadDriver,
    agent_config,
    broker_config,
    broker_serve,
    make_agent,
    running,
    until,
)

from agent.config import MemoryLimits as AgentMemoryLimits
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from vmtide.fakesys import FakeGuest, Load

MiB = 1 << 20
GiB = 1 << 30


def state(tmp: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((tmp / "broker.json").read_text())["guests"]["g1"]  # type: ignore[no-any-return]


@pytest.fixture
def guest(tmp_path: Path) -> FakeGuest:
    return FakeGuest(tmp_path / "g1", possible_cpus=4, boot_cpus=1, boot_blocks=8)


def guest_config(tmp_path: Path, guest: FakeGuest) -> GuestConfig:
    return GuestConfig(
        id="g1",
        listen=f"unix:{tmp_path}/g1.sock",
        backend="simulated",
        simulated_root=guest.root,
        cpus=CpuLimits(minimum=1, maximum=4),
        memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        reclaim_deadline_seconds=5.0,
    )


async def test_cpus_follow_load_up_and_down(tmp_path: Path, guest: FakeGuest) -> None:
    config = broker_config(tmp_path, [guest_config(tmp_path, guest)], cpus=4, memory=4 * GiB)
    agent = make_agent(agent_config(guest, "g1", f"unix:{tmp_path}/g1.sock"))
    driver = LoadDriver(guest, Load(cpus=0.2, memory_bytes=256 * MiB))
    async with running(await broker_serve(config), driver.run, agent.run):
        await until(lambda: agent.link is not None and agent.link.connected, 10, "a session")
        assert guest.present_cpus() == {0}
        driver.load = Load(cpus=3.5, memory_bytes=256 * MiB)
        await until(lambda: len(guest.online_cpus()) >= 3, 20, "3+ cpus online")
        # The broker hot-plugged them and accounts for them.
        assert len(guest.present_cpus()) >= 3
        await until(lambda: state(tmp_path)["online"]["cpus"] >= 3, 5, "broker sees the cpus")
        assert state(tmp_path)["granted"]["cpus"] >= 3
        driver.load = Load(cpus=0.2, memory_bytes=256 * MiB)
        await until(lambda: guest.online_cpus() == {0}, 30, "back to cpu0 only")
        # What the guest offlined was unplugged: nothing left plugged but unused.
        await until(lambda: guest.present_cpus() == {0}, 10, "cpus unplugged")
        await until(lambda: state(tmp_path)["online"]["cpus"] == 1, 5, "broker books match")
    offline_done = agent.metrics.operations.labels("cpus", "offline", "done")._value.get()
    assert offline_done >= 2


async def test_memory_follows_load_and_refusals_are_reported(
    tmp_path: Path, guest: FakeGuest
) -> None:
    config = broker_config(tmp_path, [guest_config(tmp_path, guest)], cpus=4, memory=4 * GiB)
    agent = make_agent(
        agent_config(
            guest,
            "g1",
            f"unix:{tmp_path}/g1.sock",
            memory=AgentMemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        )
    )
    driver = LoadDriver(guest, Load(cpus=0.2, memory_bytes=512 * MiB))
    async with running(await broker_serve(config), driver.run, agent.run):
        await until(lambda: agent.link is not None and agent.link.connected, 10, "a session")
        boot = guest.online_memory_bytes()
        driver.load = Load(cpus=0.2, memory_bytes=1200 * MiB)
        await until(lambda: guest.online_memory_bytes() >= boot + 2 * 128 * MiB, 20, "memory grows")
        added = [i for i in guest.online_blocks() if i >= 8]
        assert added, "hot-added blocks are online"
        zones = {
            (guest.sysfs / f"devices/system/memory/memory{i}/valid_zones").read_text().strip()
            for i in added
        }
        assert zones == {"Movable"}
        # One block will refuse to go offline.
        stuck = added[0]
        guest.set_faults(
            [{"kind": "memory", "index": stuck, "effect": errno.EBUSY, "value": "offline"}]
        )
        driver.load = Load(cpus=0.2, memory_bytes=256 * MiB)
        await until(
            lambda: guest.online_blocks() == [*range(8), stuck],
            30,
            "all but the stuck block offline",
        )
        await until(
            lambda: guest.block_indexes() == [*range(8), stuck], 10, "freed blocks unplugged"
        )
        # The broker's books match the guest: the refused block is still held.
        await until(
            lambda: state(tmp_path)["online"]["memory_bytes"] == guest.online_memory_bytes(),
            10,
            "broker accounting matches the guest",
        )
    refused = agent.metrics.operations.labels("memory", "offline", "refused")._value.get()
    assert refused >= 1
    assert guest.online_memory_bytes() >= 1 * GiB  # never below the minimum


async def test_a_guest_claiming_another_identity_is_refused(
    tmp_path: Path, guest: FakeGuest
) -> None:
    config = broker_config(tmp_path, [guest_config(tmp_path, guest)], cpus=4, memory=4 * GiB)
    impostor = make_agent(agent_config(guest, "someone-else", f"unix:{tmp_path}/g1.sock"))
    async with running(await broker_serve(config), impostor.run):
        await until((tmp_path / "broker.json").exists, 10, "the broker to start")
        link = impostor.link
        assert link is not None
        await until(lambda: link.reconnects >= 2, 10, "retries")
        assert not link.connected
        assert not state(tmp_path)["connected"]


async def test_broker_restart_reconverges_without_losing_grants(
    tmp_path: Path, guest: FakeGuest
) -> None:
    config = broker_config(tmp_path, [guest_config(tmp_path, guest)], cpus=4, memory=4 * GiB)
    agent = make_agent(agent_config(guest, "g1", f"unix:{tmp_path}/g1.sock"))
    driver = LoadDriver(guest, Load(cpus=2.5, memory_bytes=256 * MiB))
    async with running(driver.run, agent.run):
        # The broker is down when the agent starts: the guest keeps its size.
        await asyncio.sleep(0.5)
        assert guest.online_cpus() == {0} and not agent.link.connected  # type: ignore[union-attr]
        async with running(await broker_serve(config)):
            await until(lambda: len(guest.online_cpus()) >= 3, 20, "cpus granted")
        # Broker gone: nothing is given back on a disconnect.
        await until(lambda: not agent.link.connected, 5, "the agent notices")  # type: ignore[union-attr]
        held = guest.online_cpus()
        assert len(held) >= 3
        async with running(await broker_serve(config)):
            await until(lambda: state(tmp_path)["connected"], 10, "reconnected")
            await until(
                lambda: state(tmp_path)["online"]["cpus"] == len(guest.online_cpus()),
                10,
                "the new broker's books match the guest",
            )
            # Nothing granted before the restart was lost or counted twice.
            assert guest.online_cpus() >= held
            await until(
                lambda: (
                    state(tmp_path)["granted"]["cpus"]
                    == state(tmp_path)["online"]["cpus"]
                    == len(guest.online_cpus())
                ),
                10,
                "granted equals what the guest holds",
            )
            assert len(guest.online_cpus()) <= 4
