"""vmtide-agent: run the daemon, show what it sees, check a config file."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from agent import config as agent_config
from agent import policy
from agent.config import AgentConfig, ConfigError
from agent.kernel import Kernel, KernelReadError
from agent.sensing import Sensor
from agent.topology import Topology
from vmtide import __version__
from vmtide.logs import setup_logging

log = logging.getLogger("vmtide.agent")

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus stops a restart
# loop on a config that will never load.
EXIT_CONFIG = 78
# mlockall(2) flags; MCL_ONFAULT (Linux 4.4) locks pages as they are touched,
# so the agent's resident set stays small but is never paged out.
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args.handler(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmtide-agent",
        description="Make this guest's CPUs and memory follow its load, "
        "negotiating with a host broker.",
    )
    parser.add_argument("--version", action="version", version=f"vmtide-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=agent_config.DEFAULT_PATH,
            help=f"config file (default {agent_config.DEFAULT_PATH}; absent means defaults)",
        )
        p.add_argument(
            "--sysfs-root", type=Path, help="sysfs mount point (default from config, /sys)"
        )
        p.add_argument(
            "--procfs-root", type=Path, help="procfs mount point (default from config, /proc)"
        )
        p.add_argument(
            "--simulated-kernel",
            action="store_true",
            help="apply vmtide's simulated-guest kernel rules to writes (fake trees only)",
        )

    run = sub.add_parser("run", help="run the daemon")
    common(run)
    run.add_argument(
        "--broker", metavar="TARGET", help="broker target: host:port, unix:PATH or vsock:CID:PORT"
    )
    run.add_argument(
        "--no-broker", action="store_true", help="run without a broker (keep the guest as it is)"
    )
    run.add_argument("--guest-id", help="identity to claim (default machine-id)")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=_run)

    status = sub.add_parser("status", help="show what the agent sees and would do")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=_check_config)
    return parser


def _load_config(args: argparse.Namespace) -> AgentConfig:
    config = agent_config.load_or_default(args.config)
    section = config.agent
    if args.sysfs_root is not None:
        section = dataclasses.replace(section, sysfs_root=args.sysfs_root)
    if args.procfs_root is not None:
        section = dataclasses.replace(section, procfs_root=args.procfs_root)
    if args.simulated_kernel:
        section = dataclasses.replace(section, simulated_kernel=True)
    return dataclasses.replace(config, agent=section)


def make_kernel(config: AgentConfig) -> Kernel:
    section = config.agent
    if section.simulated_kernel:
        from vmtide.fakesys import FakeKernelWriter

        writer = FakeKernelWriter(section.sysfs_root.parent)
        return Kernel(section.sysfs_root, section.procfs_root, writer=writer)
    return Kernel(section.sysfs_root, section.procfs_root)


def guest_identity(configured: str, machine_id: Path = Path("/etc/machine-id")) -> str:
    if configured:
        return configured
    try:
        text = machine_id.read_text().strip()
    except OSError:
        text = ""
    return text or socket.gethostname()


def _check_config(args: argparse.Namespace) -> int:
    try:
        agent_config.load(args.file)
    except ConfigError as err:
        print(f"vmtide-agent: {err}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = _load_config(args)
        if args.broker or args.no_broker:
            broker = dataclasses.replace(
                config.broker,
                target=args.broker or config.broker.target,
                enabled=not args.no_broker,
            )
            config = dataclasses.replace(config, broker=broker)
        if args.guest_id:
            config = dataclasses.replace(
                config, agent=dataclasses.replace(config.agent, guest_id=args.guest_id)
            )
        if args.metrics_port is not None:
            metrics = dataclasses.replace(
                config.metrics, port=args.metrics_port, enabled=args.metrics_port != 0
            )
            config = dataclasses.replace(config, metrics=metrics)
    except ConfigError as err:
        print(f"vmtide-agent: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if config.agent.lock_memory:
        _lock_memory()
    if not config.agent.simulated_kernel:
        _protect_from_oom(config.agent.oom_score_adj)
    try:
        return asyncio.run(_serve(config))
    except KernelReadError as err:
        log.error("cannot read the guest's topology: %s", err)
        return 1


def _lock_memory() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        log.warning(
            "cannot lock the agent's memory (%s); it may be paged out under pressure",
            os.strerror(err),
        )


def _protect_from_oom(score: int, path: Path = Path("/proc/self/oom_score_adj")) -> None:
    try:
        if int(path.read_text()) <= score:
            return  # systemd's OOMScoreAdjust= already did it
        path.write_text(f"{score}\n")
    except (OSError, ValueError) as err:
        log.warning("cannot set the agent's oom_score_adj to %d (%s)", score, err)


async def _serve(config: AgentConfig) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from agent.actuator import Actuator
    from agent.daemon import Agent
    from agent.metrics import AgentMetrics
    from agent.sensing import PressureWatch
    from agent.udev import UdevMonitor, find_onlining_rules
    from vmtide.notify import SystemdNotifier

    kernel = make_kernel(config)
    actuator = Actuator(kernel, config.memory.online_type, config.memory.offline_timeout_seconds)
    registry = CollectorRegistry()
    holder: list[Agent] = []
    metrics = AgentMetrics(
        registry,
        topology=lambda: holder[0].topo if holder else None,
        broker=config.broker.enabled,
        limits=lambda: holder[0].limits if holder else None,
    )
    real_kernel = not config.agent.simulated_kernel and config.agent.sysfs_root == Path("/sys")
    # A simulated guest's pressure files are plain files: a trigger written
    # there would corrupt them, and they never signal.
    pressure = (
        None
        if config.agent.simulated_kernel
        else PressureWatch(
            config.agent.procfs_root,
            stall_us=config.agent.psi_trigger_stall_us,
            window_us=config.agent.psi_trigger_window_us,
        )
    )
    notifier = SystemdNotifier()
    agent = Agent(
        config,
        actuator,
        Sensor(config.agent.procfs_root),
        metrics,
        guest_id=guest_identity(config.agent.guest_id),
        pressure=pressure,
        uevents=UdevMonitor() if real_kernel else None,
        notify=notifier,
    )
    holder.append(agent)
    if real_kernel:
        for rule in find_onlining_rules():
            log.info("udev rule %s onlines hot-added resources; vmtide works alongside it", rule)
    if config.metrics.enabled and config.metrics.port:
        start_http_server(config.metrics.port, config.metrics.address, registry=registry)
        log.info("metrics on http://%s:%d/metrics", config.metrics.address, config.metrics.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "vmtide-agent %s: guest %r, %d/%d cpus, %.0f MiB online, broker %s",
        __version__,
        agent.guest_id,
        agent.topo.online_cpus,
        len(agent.topo.possible_cpus),
        agent.topo.online_memory_bytes / (1 << 20),
        config.broker.target if config.broker.enabled else "disabled",
    )
    try:
        await agent.run(stop)
    finally:
        if pressure is not None:
            pressure.close()
        notifier("STOPPING=1")
        notifier.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args)
    except ConfigError as err:
        print(f"vmtide-agent: {err}", file=sys.stderr)
        return EXIT_CONFIG
    from agent.daemon import effective_limits, make_sample

    kernel = make_kernel(config)
    try:
        topo = Topology.read(kernel)
    except KernelReadError as err:
        print(f"vmtide-agent: cannot read the topology: {err}", file=sys.stderr)
        return 1
    sensor = Sensor(config.agent.procfs_root)
    sensor.sample()
    time.sleep(0.5)  # CPU use is a rate: two samples, half a second apart
    reading = sensor.sample()
    limits = effective_limits(config, topo, None)
    sample = make_sample(reading, topo)
    decisions, _ = policy.decide(
        [sample], limits.cpus, limits.memory, topo.block_size, config.policy, policy.PolicyState()
    )
    status: dict[str, Any] = {
        "cpus": {
            "possible": len(topo.possible_cpus),
            "present": len(topo.cpus),
            "online": topo.online_cpus,
            "standby": list(topo.standby_cpus),
            "limits": dataclasses.asdict(limits.cpus),
            "busy": round(reading.cpu_busy, 3),
            "would": {"target": decisions.cpu.target, "reason": decisions.cpu.reason},
        },
        "memory": {
            "block_size_bytes": topo.block_size,
            "online_bytes": topo.online_memory_bytes,
            "movable_online_bytes": sum(b.movable for b in topo.blocks) * topo.block_size,
            "standby_blocks": list(topo.standby_blocks),
            "available_bytes": reading.memory_available,
            "auto_online_blocks": topo.auto_online,
            "limits": dataclasses.asdict(limits.memory),
            "would": {"target": decisions.memory.target, "reason": decisions.memory.reason},
        },
        "pressure": {
            "available": reading.psi_available,
            "cpu_some": reading.cpu_some,
            "memory_some": reading.memory_some,
            "memory_full": reading.memory_full,
            "io_some": reading.io_some,
        },
    }
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    cpu, mem = status["cpus"], status["memory"]
    mib = 1 << 20
    print(
        f"cpus    {cpu['online']} online of {cpu['present']} present, {cpu['possible']} possible;"
        f" standby {cpu['standby'] or 'none'}; busy {cpu['busy']:.2f}"
    )
    print(
        f"        limits {limits.cpus.minimum}-{limits.cpus.maximum} (burst {limits.cpus.burst});"
        f" would hold {decisions.cpu.target}: {decisions.cpu.reason}"
    )
    print(
        f"memory  {mem['online_bytes'] // mib} MiB online ({mem['movable_online_bytes'] // mib} MiB"
        f" movable), {len(topo.standby_blocks)} standby blocks of {topo.block_size // mib} MiB;"
        f" available {reading.memory_available // mib} MiB; auto_online_blocks={topo.auto_online}"
    )
    print(
        f"        limits {limits.memory.minimum // mib}-{limits.memory.maximum // mib} MiB"
        f" (burst {limits.memory.burst // mib} MiB);"
        f" would hold {decisions.memory.target // mib} MiB:"
        f" {decisions.memory.reason}"
    )
    psi = status["pressure"]
    if psi["available"]:
        print(
            f"psi     cpu some {psi['cpu_some']:.1f}%, memory some {psi['memory_some']:.1f}%"
            f" full {psi['memory_full']:.1f}%, io some {psi['io_some']:.1f}%"
        )
    else:
        print("psi     not available on this kernel (sampling only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
