"""The agent's configuration (/etc/vmtide/agent.toml), validated at load.

Every section and key is optional; the defaults suit a web server on a guest
whose limits the host also enforces. See docs/configuration.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from agent.kernel import MEMORY_OFFLINE_TIMEOUT_SECONDS, OnlineType
from agent.policy import PolicyParams
from vmtide.config import ConfigError, build, load_toml
from vmtide.relay import parse_vsock_target

DEFAULT_PATH = Path("/etc/vmtide/agent.toml")
# The unit's RuntimeDirectory=vmtide-agent: writable under ProtectSystem=strict.
DEFAULT_STATE_FILE = Path("/run/vmtide-agent/state.json")
GiB = 1 << 30


@dataclass(frozen=True)
class AgentSection:
    # Who this guest says it is; empty means /etc/machine-id, then the hostname.
    guest_id: str = ""
    # How often to sample load and decide. PSI triggers wake the agent sooner.
    sensing_interval_seconds: float = 1.0
    # Full sysfs rescans to catch lost uevents (Kata saw them dropped on large
    # hot-adds); a rescan also follows every reconnect.
    rescan_interval_seconds: float = 30.0
    sysfs_root: Path = Path("/sys")
    procfs_root: Path = Path("/proc")
    # Apply the simulated guest's kernel rules to writes (vmtide.fakesys); only
    # for a fake tree under sysfs_root's parent.
    simulated_kernel: bool = False
    # PSI trigger: wake when tasks stall this long within the window.
    psi_trigger_stall_us: int = 150_000
    psi_trigger_window_us: int = 1_000_000
    # Lock the agent's memory so it keeps deciding while the guest thrashes.
    lock_memory: bool = True
    # The agent's own OOM score: the OOM killer must never pick the process
    # that can add memory. The unit sets it too (OOMScoreAdjust=-1000).
    oom_score_adj: int = -1000
    # The live state `vmtide-agent status` shows, rewritten about once a second.
    publish_state: bool = True
    state_file: Path = DEFAULT_STATE_FILE

    @property
    def live_state_file(self) -> Path | None:
        """Where the daemon publishes its state; None when it does not.

        A run on a fake tree keeps the default path off the real /run, where
        it could pass for the guest's own agent: the file goes next to the tree.
        """
        if not self.publish_state:
            return None
        fake = self.simulated_kernel or self.sysfs_root != Path("/sys")
        if fake and self.state_file == DEFAULT_STATE_FILE:
            return self.sysfs_root.parent / "agent.json"
        return self.state_file

    def __post_init__(self) -> None:
        if not 0.05 <= self.sensing_interval_seconds <= 60:
            raise ValueError("sensing_interval_seconds: must be between 0.05 and 60")
        if self.rescan_interval_seconds < self.sensing_interval_seconds:
            raise ValueError("rescan_interval_seconds: must not be below sensing_interval_seconds")
        if not 0 < self.psi_trigger_stall_us <= self.psi_trigger_window_us:
            raise ValueError("psi_trigger_stall_us: must be positive and at most the window")
        if not -1000 <= self.oom_score_adj <= 1000:
            raise ValueError("oom_score_adj: must be between -1000 and 1000")
        if not 500_000 <= self.psi_trigger_window_us <= 10_000_000:
            # The kernel accepts windows of 0.5 s to 10 s (psi.rst).
            raise ValueError("psi_trigger_window_us: must be between 500000 and 10000000")


@dataclass(frozen=True)
class BrokerSection:
    enabled: bool = True
    # gRPC target: "host:port", "unix:/path" or "vsock:CID:PORT" (CID 2 is the
    # host). The default reaches a broker on the host over vsock, through the
    # agent's own relay (vmtide.relay): PyPI's grpcio has no vsock.
    target: str = "vsock:2:7470"
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Reconnect backoff, with full jitter between min and the current ceiling.
    reconnect_min_seconds: float = 0.5
    reconnect_max_seconds: float = 30.0
    # An unanswered request is repeated after this long.
    request_retry_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target: must not be empty")
        try:
            vsock = parse_vsock_target(self.target)
        except ValueError as err:
            raise ValueError(f"target: {err}") from err
        if vsock is not None and self.tls:
            # The broker's vsock listener is plaintext: the CID is the identity.
            raise ValueError("tls: not over vsock (the broker's vsock listener has no TLS)")
        if not 0 < self.reconnect_min_seconds <= self.reconnect_max_seconds:
            raise ValueError("reconnect_min_seconds: must be positive and at most the max")
        if not 0 < self.request_retry_seconds < math.inf:
            raise ValueError("request_retry_seconds: must be positive and finite")
        if self.tls and (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")


@dataclass(frozen=True)
class CpuLimits:
    minimum: int = 1
    # 0 means every possible CPU.
    maximum: int = 0
    # 0 means the same as maximum (no bursting).
    burst: int = 0
    # CPUs to keep plugged but offline beyond those online, within maximum:
    # a load step onlines one at once, with no hot-plug and no request. The
    # host holds them for the guest (an idle vCPU costs it a thread).
    standby: int = 0

    def __post_init__(self) -> None:
        if self.minimum < 1:
            raise ValueError("minimum: a guest needs at least 1 CPU")
        if self.standby < 0:
            raise ValueError(f"standby: must not be negative, got {self.standby}")
        if self.maximum and self.maximum < self.minimum:
            raise ValueError(f"maximum: {self.maximum} is below minimum {self.minimum}")
        if self.burst and self.burst < (self.maximum or self.minimum):
            raise ValueError(f"burst: {self.burst} is below maximum {self.maximum}")


@dataclass(frozen=True)
class MemoryLimits:
    minimum_bytes: int = 1 * GiB
    # 0 means all memory the guest could ever have (every listed block).
    maximum_bytes: int = 0
    burst_bytes: int = 0

    def __post_init__(self) -> None:
        if self.minimum_bytes <= 0:
            raise ValueError("minimum_bytes: must be positive")
        if self.maximum_bytes and self.maximum_bytes < self.minimum_bytes:
            raise ValueError(
                f"maximum_bytes: {self.maximum_bytes} is below minimum {self.minimum_bytes}"
            )
        if self.burst_bytes and self.burst_bytes < (self.maximum_bytes or self.minimum_bytes):
            raise ValueError(f"burst_bytes: {self.burst_bytes} is below maximum")


@dataclass(frozen=True)
class LimitsSection:
    cpus: CpuLimits = CpuLimits()
    memory: MemoryLimits = MemoryLimits()


@dataclass(frozen=True)
class MemorySection:
    # Movable so the memory can be given back; "online_kernel" for guests
    # whose workloads need kernel allocations from hot-added memory.
    online_type: OnlineType = OnlineType.MOVABLE
    offline_timeout_seconds: float = MEMORY_OFFLINE_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.offline_timeout_seconds < math.inf:
            raise ValueError("offline_timeout_seconds: must be positive and finite")


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = True
    # Loopback by default: the endpoint is read-only, but topology and load are
    # still nobody else's business unless the operator says so.
    address: str = "127.0.0.1"
    port: int = 9474

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = AgentSection()
    broker: BrokerSection = BrokerSection()
    limits: LimitsSection = LimitsSection()
    memory: MemorySection = MemorySection()
    policy: PolicyParams = field(default_factory=PolicyParams)
    metrics: MetricsSection = MetricsSection()


def load(path: Path) -> AgentConfig:
    """Load and validate a config file; raise ConfigError naming file, key and reason."""
    return build(AgentConfig, load_toml(path), file=path)


def load_or_default(path: Path) -> AgentConfig:
    """The default path may be absent (defaults apply); an explicit one may not."""
    if path == DEFAULT_PATH and not path.exists():
        return AgentConfig()
    return load(path)


__all__ = ["AgentConfig", "ConfigError", "load", "load_or_default"]
