"""Building blocks for tests that run the real agent and broker on simulated guests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.actuator import Actuator
from agent.config import AgentConfig, AgentSection, BrokerSection, MetricsSection
from agent.daemon import Agent
from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.policy import CpuParams, MemoryParams, PolicyParams
from agent.sensing import Sensor
from broker.cli import serve
from broker.config import BrokerConfig, GuestConfig
from broker.config import BrokerSection as BrokerOptions
from vmtide.fakesys import FakeGuest, Load

# Short windows so a test sees a whole grow-and-shrink cycle in seconds.
FAST_POLICY = PolicyParams(
    cpu=CpuParams(
        shrink_window_seconds=2.0,
        shrink_interval_seconds=0.5,
        shrink_step_ratio=1.0,
        psi_settle_seconds=1.0,
        grow_window_seconds=0.3,
    ),
    memory=MemoryParams(
        shrink_window_seconds=2.0,
        shrink_interval_seconds=0.5,
        shrink_step_ratio=1.0,
        psi_settle_seconds=1.0,
        headroom_min_bytes=128 << 20,
        headroom_percent=5.0,
    ),
)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for `condition` with a deadline; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class LoadDriver:
    """Advances a simulated guest's clock under a load the test changes at will."""

    def __init__(self, guest: FakeGuest, load: Load | None = None, period: float = 0.1) -> None:
        self.guest = guest
        self.load = load or Load(cpus=0.2, memory_bytes=0)
        self.period = period

    async def run(self, stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period)
            now = time.monotonic()
            self.guest.tick(now - last, self.load)
            last = now


def agent_config(guest: FakeGuest, guest_id: str, target: str, **limits: object) -> AgentConfig:
    config = AgentConfig(
        agent=AgentSection(
            guest_id=guest_id,
            sensing_interval_seconds=0.1,
            rescan_interval_seconds=1.0,
            sysfs_root=guest.sysfs,
            procfs_root=guest.procfs,
            simulated_kernel=True,
            lock_memory=False,
        ),
        broker=BrokerSection(
            target=target,
            reconnect_min_seconds=0.1,
            reconnect_max_seconds=0.5,
            request_retry_seconds=1.0,
        ),
        policy=FAST_POLICY,
        metrics=MetricsSection(enabled=False),
    )
    if limits:
        config = dataclasses.replace(
            config,
            limits=dataclasses.replace(config.limits, **limits),  # type: ignore[arg-type]
        )
    return config


def make_agent(config: AgentConfig, registry: CollectorRegistry | None = None) -> Agent:
    from vmtide.fakesys import FakeKernelWriter

    kernel = Kernel(
        config.agent.sysfs_root,
        config.agent.procfs_root,
        writer=FakeKernelWriter(config.agent.sysfs_root.parent),
    )
    registry = registry or CollectorRegistry()
    holder: list[Agent] = []
    metrics = AgentMetrics(registry, topology=lambda: holder[0].topo if holder else None)
    agent = Agent(
        config,
        Actuator(kernel, offline_timeout=2.0),
        Sensor(config.agent.procfs_root),
        metrics,
        guest_id=config.agent.guest_id,
    )
    holder.append(agent)
    return agent


def broker_config(tmp: Path, guests: list[GuestConfig], cpus: int, memory: int) -> BrokerConfig:
    from broker.config import PoolConfig

    return BrokerConfig(
        broker=BrokerOptions(
            state_file=tmp / "broker.json",
            arbitrate_interval_seconds=0.2,
            max_requests_per_second=50.0,
            metrics_port=0,
        ),
        pool=PoolConfig(cpus=cpus, memory_bytes=memory),
        guests=tuple(guests),
    )


@contextlib.asynccontextmanager
async def running(
    *coroutines: Callable[[asyncio.Event], Coroutine[Any, Any, object]],
) -> AsyncIterator[asyncio.Event]:
    """Run `fn(stop)` for each fn until the block ends; re-raise their failures."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(fn(stop)) for fn in coroutines]
    try:
        yield stop
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def broker_serve(config: BrokerConfig) -> Callable[[asyncio.Event], Coroutine[Any, Any, int]]:
    async def run(stop: asyncio.Event) -> int:
        return await serve(config, stop)

    return run
