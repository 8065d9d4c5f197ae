"""The broker's configuration (/etc/vmtide/broker.toml), validated at load.

[broker]
state_file = "/run/vmtide/broker.json"

[pool]                    # what the broker may hand out across all guests
cpus = 16
memory_bytes = "64GiB"

[[guests]]
id = "web-1"
listen = "unix:/run/vmtide/web-1.sock"   # or "127.0.0.1:7471"
priority = 10
backend = "qmp"
qmp_socket = "/run/qemu/web-1.qmp"
[guests.cpus]
minimum = 1
maximum = 4
burst = 6
[guests.memory]
minimum_bytes = "1GiB"
maximum_bytes = "8GiB"
burst_bytes = "12GiB"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vmtide.config import ConfigError, build, load_toml

DEFAULT_PATH = Path("/etc/vmtide/broker.toml")
_MAX_DEADLINE_SECONDS = ((1 << 32) - 1) // 1000
GiB = 1 << 30
# vsock CIDs 0 (hypervisor), 1 (local) and 2 (host) are never a guest's;
# 0xFFFFFFFF is VMADDR_CID_ANY. Ports are 32-bit, 0xFFFFFFFF VMADDR_PORT_ANY.
_FIRST_GUEST_CID = 3
_VSOCK_ANY = (1 << 32) - 1


@dataclass(frozen=True)
class CpuLimits:
    minimum: int = 1
    maximum: int = 1
    burst: int = 0  # 0: same as maximum

    def __post_init__(self) -> None:
        if self.minimum < 1:
            raise ValueError("minimum: a guest needs at least 1 CPU")
        if self.maximum < self.minimum:
            raise ValueError(f"maximum: {self.maximum} is below minimum {self.minimum}")
        if self.burst and self.burst < self.maximum:
            raise ValueError(f"burst: {self.burst} is below maximum {self.maximum}")


@dataclass(frozen=True)
class MemoryLimits:
    minimum_bytes: int = 1 * GiB
    maximum_bytes: int = 1 * GiB
    burst_bytes: int = 0  # 0: same as maximum

    def __post_init__(self) -> None:
        if self.minimum_bytes <= 0:
            raise ValueError("minimum_bytes: must be positive")
        if self.maximum_bytes < self.minimum_bytes:
            raise ValueError(f"maximum_bytes: {self.maximum_bytes} is below minimum")
        if self.burst_bytes and self.burst_bytes < self.maximum_bytes:
            raise ValueError(f"burst_bytes: {self.burst_bytes} is below maximum")


@dataclass(frozen=True)
class GuestConfig:
    id: str
    # Where this guest's agent connects: "host:port" or "unix:/path". The
    # listener is the guest's identity: only this guest can reach it.
    listen: str = ""
    # With TLS on a shared listener: the client certificate's common name.
    tls_common_name: str = ""
    # On the shared vsock listener (broker.vsock_port): the guest's CID, as
    # given to QEMU (-device vhost-vsock-pci,guest-cid=N); 0: none.
    vsock_cid: int = 0
    priority: int = 0
    backend: str = "qmp"  # "qmp" or "simulated"
    qmp_socket: Path | None = None
    # For backend = "simulated": the FakeGuest tree the agent runs against.
    simulated_root: Path | None = None
    cpus: CpuLimits = CpuLimits()
    memory: MemoryLimits = MemoryLimits()
    # Largest single memory hot-add; big ones stall guests (memmap allocation).
    memory_step_bytes: int = 512 << 20
    # How long a guest has to answer a reclaim.
    reclaim_deadline_seconds: float = 30.0
    # Inflate the guest's balloon (if QEMU gives it one) over memory a reclaim
    # could not unplug; deflated again before memory is plugged (docs/broker.md).
    balloon_fallback: bool = False

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("id: must not be empty")
        if not self.listen and not self.tls_common_name and not self.vsock_cid:
            raise ValueError(
                "listen: each guest needs its own listen address (or tls_common_name or vsock_cid)"
            )
        if self.vsock_cid and not _FIRST_GUEST_CID <= self.vsock_cid < _VSOCK_ANY:
            raise ValueError(
                f"vsock_cid: {self.vsock_cid} is not a guest CID ({_FIRST_GUEST_CID} to "
                f"{_VSOCK_ANY - 1}; 0 for none)"
            )
        if self.backend not in ("qmp", "simulated"):
            raise ValueError(f"backend: {self.backend!r} is not one of qmp, simulated")
        if self.backend == "qmp" and self.qmp_socket is None:
            raise ValueError('qmp_socket: required with backend = "qmp"')
        if self.backend == "simulated" and self.simulated_root is None:
            raise ValueError('simulated_root: required with backend = "simulated"')
        if self.reclaim_deadline_seconds <= 0:
            raise ValueError("reclaim_deadline_seconds: must be positive")
        if self.reclaim_deadline_seconds > _MAX_DEADLINE_SECONDS:
            # Reclaim.deadline_ms is a uint32 of milliseconds.
            raise ValueError(f"reclaim_deadline_seconds: must be at most {_MAX_DEADLINE_SECONDS}")


@dataclass(frozen=True)
class PoolConfig:
    cpus: int = 1
    memory_bytes: int = 1 * GiB

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.memory_bytes <= 0:
            raise ValueError("cpus: the pool needs at least 1 CPU and some memory")


@dataclass(frozen=True)
class BrokerSection:
    state_file: Path = Path("/run/vmtide/broker.json")
    # Shared TLS listener (optional): guests are told apart by certificate.
    tls_listen: str = ""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Memory moves in these; the guest's Hello confirms its real block size.
    block_size_bytes: int = 128 << 20
    # How often to re-run arbitration without an event (burst expiry, retries).
    arbitrate_interval_seconds: float = 5.0
    # Requests from one guest beyond this rate are answered at this rate.
    max_requests_per_second: float = 5.0
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9475
    # Shared vsock listener (optional, 0: none): guests are told apart by
    # their CID, which the host's vhost-vsock vouches for.
    vsock_port: int = 0

    def __post_init__(self) -> None:
        size = self.block_size_bytes
        if size <= 0 or size & (size - 1):
            raise ValueError(f"block_size_bytes: {size} is not a power of two")
        for name in ("arbitrate_interval_seconds", "max_requests_per_second"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}: must be positive and finite")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is not a TCP port")
        if not 0 <= self.vsock_port < _VSOCK_ANY:
            raise ValueError(f"vsock_port: {self.vsock_port} is not a vsock port")
        if self.tls_listen and not (
            self.tls_cert_file and self.tls_key_file and self.tls_client_ca_file
        ):
            raise ValueError("tls_listen: needs tls_cert_file, tls_key_file and tls_client_ca_file")


@dataclass(frozen=True)
class BrokerConfig:
    broker: BrokerSection = BrokerSection()
    pool: PoolConfig = PoolConfig()
    guests: tuple[GuestConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        ids = [g.id for g in self.guests]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"guests: duplicate guest id {duplicates[0]!r}")
        listens = [g.listen for g in self.guests if g.listen]
        shared = sorted({a for a in listens if listens.count(a) > 1})
        if shared:
            raise ValueError(f"guests: two guests share listen address {shared[0]!r}")
        if (
            any(g.tls_common_name and not g.listen for g in self.guests)
            and not self.broker.tls_listen
        ):
            raise ValueError("guests: tls_common_name needs broker.tls_listen")
        cids = [g.vsock_cid for g in self.guests if g.vsock_cid]
        shared_cids = sorted({c for c in cids if cids.count(c) > 1})
        if shared_cids:
            raise ValueError(f"guests: two guests share vsock_cid {shared_cids[0]}")
        if cids and not self.broker.vsock_port:
            raise ValueError("guests: vsock_cid needs broker.vsock_port")


def load(path: Path) -> BrokerConfig:
    return build(BrokerConfig, load_toml(path), file=path)


__all__ = ["BrokerConfig", "ConfigError", "GuestConfig", "load"]
