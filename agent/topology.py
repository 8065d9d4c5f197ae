"""A snapshot of the guest's CPUs and memory blocks, and its proto form."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from agent.kernel import (
    BOOT_CPU,
    Action,
    BlockState,
    Cpu,
    ItemResult,
    Kernel,
    Kind,
    MemoryBlock,
    Outcome,
)
from vmtide.v1 import broker_pb2 as pb

_BLOCK_STATES = {
    BlockState.ONLINE: pb.BLOCK_STATE_ONLINE,
    BlockState.OFFLINE: pb.BLOCK_STATE_OFFLINE,
    BlockState.GOING_OFFLINE: pb.BLOCK_STATE_GOING_OFFLINE,
}


@dataclass(frozen=True)
class Topology:
    possible_cpus: frozenset[int]
    cpus: tuple[Cpu, ...]  # present CPUs
    block_size: int
    blocks: tuple[MemoryBlock, ...]
    auto_online: str  # memory/auto_online_blocks

    @classmethod
    def read(cls, kernel: Kernel) -> Topology:
        return cls(
            possible_cpus=kernel.cpus_possible(),
            cpus=tuple(kernel.cpus()),
            block_size=kernel.block_size(),
            blocks=tuple(kernel.memory_blocks()),
            auto_online=kernel.auto_online_blocks(),
        )

    def applied(self, results: Iterable[ItemResult]) -> Topology:
        """This snapshot with what the kernel reported item by item.

        Only for when sysfs cannot be read back after a resize: an estimate
        good enough to acknowledge with until the next rescan reads the truth.
        """
        cpus = {c.id: c for c in self.cpus}
        blocks = {b.index: b for b in self.blocks}
        for item in results:
            if item.kind is Kind.CPU and item.index in cpus:
                if item.outcome is Outcome.NOT_FOUND:
                    del cpus[item.index]
                elif item.ok:
                    online = item.action is Action.ONLINE
                    cpus[item.index] = dataclasses.replace(cpus[item.index], online=online)
            elif item.kind is Kind.MEMORY_BLOCK and item.index in blocks:
                if item.outcome is Outcome.NOT_FOUND:
                    del blocks[item.index]
                elif item.ok:
                    online = item.action is Action.ONLINE
                    state = BlockState.ONLINE if online else BlockState.OFFLINE
                    blocks[item.index] = dataclasses.replace(blocks[item.index], state=state)
        return dataclasses.replace(
            self,
            cpus=tuple(cpus[i] for i in sorted(cpus)),
            blocks=tuple(blocks[i] for i in sorted(blocks)),
        )

    @property
    def online_cpus(self) -> int:
        return sum(c.online for c in self.cpus)

    @property
    def standby_cpus(self) -> tuple[int, ...]:
        """Plugged by the host, not yet onlined."""
        return tuple(c.id for c in self.cpus if not c.online)

    @property
    def online_memory_bytes(self) -> int:
        return sum(b.online for b in self.blocks) * self.block_size

    @property
    def standby_blocks(self) -> tuple[int, ...]:
        return tuple(b.index for b in self.blocks if b.state is BlockState.OFFLINE)

    @property
    def standby(self) -> tuple[frozenset[int], frozenset[int]]:
        """Standby CPUs and blocks as sets, to tell later hot-adds apart."""
        return frozenset(self.standby_cpus), frozenset(self.standby_blocks)

    @property
    def max_memory_bytes(self) -> int:
        """Everything the guest lists now; hot-plug may add more later."""
        return len(self.blocks) * self.block_size

    def to_proto(self) -> pb.Topology:
        online = [c.id for c in self.cpus if c.online]
        return pb.Topology(
            cpus=pb.CpuTopology(
                possible=sorted(self.possible_cpus),
                present=[c.id for c in self.cpus],
                online=online,
                # cpu0 too where it has an `online` file: the agent never offlines it.
                pinned=[c.id for c in self.cpus if not c.hotpluggable or c.id == BOOT_CPU],
            ),
            memory=pb.MemoryTopology(
                block_size_bytes=self.block_size,
                blocks=[
                    pb.MemoryBlock(
                        index=b.index,
                        state=_BLOCK_STATES[b.state],
                        zone=pb.ZONE_MOVABLE if b.zones[:1] == ("Movable",) else pb.ZONE_KERNEL,
                        node=b.node or 0,
                    )
                    for b in self.blocks
                ],
                auto_online=self.auto_online != "offline",
            ),
        )
