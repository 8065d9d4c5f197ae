"""vmtide-agent: run the daemon, show what it sees, check a config file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
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
from agent.memlock import lock_memory, shed_when_warm
from agent.sensing import Reading, Sensor
from agent.topology import Topology
from vmtide import __version__
from vmtide.logs import setup_logging

log = logging.getLogger("vmtide.agent")

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus stops a restart
# loop on a config that will never load.
EXIT_CONFIG = 78
# The daemon rewrites its live state every sensing cycle (at most once a
# second): older than this many cycles, no daemon is running, or it is stuck.
_LIVE_STATE_STALE_CYCLES = 3
_LIVE_STATE_STALE_MIN_SECONDS = 5.0
_MiB = 1 << 20


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

    status = sub.add_parser(
        "status",
        help="show what the running agent sees and does (else a one-shot sample)",
    )
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
    if not config.agent.simulated_kernel:
        _protect_from_oom(config.agent.oom_score_adj)
    try:
        return asyncio.run(_serve(config))
    except KernelReadError as err:
        log.error("cannot read the guest's topology: %s", err)
        return 1


def _memory_calm(reading: Reading | None) -> bool:
    """No memory stall worth the name over the last 10 s (PSI avg10 under 1 %)."""
    return reading is not None and reading.memory_some < 1.0


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
    from agent.daemon import Agent, LiveStateFile
    from agent.metrics import AgentMetrics
    from agent.sensing import PressureWatch
    from agent.udev import UdevMonitor, find_onlining_rules
    from vmtide.notify import SystemdNotifier

    # Locked once the imports are made, so that their import-time pages are not.
    locked = config.agent.lock_memory and lock_memory()
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
    state_path = config.agent.live_state_file
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
        # A fake tree is not governed by this machine's udev rules.
        onlining_rules=find_onlining_rules() if real_kernel else (),
        state_file=LiveStateFile(state_path) if state_path is not None else None,
    )
    holder.append(agent)
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
    shedding = (
        asyncio.create_task(shed_when_warm(stop, lambda: _memory_calm(agent.last_reading)))
        if locked
        else None
    )
    try:
        await agent.run(stop)
    finally:
        if shedding is not None:
            shedding.cancel()
        if pressure is not None:
            pressure.close()
        notifier("STOPPING=1")
        notifier.close()
    return 0


def read_live_state(path: Path, now: float) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's state, or None and why there is none to show."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no agent is publishing its state at {path}"
    except OSError as err:
        return None, f"cannot read {path}: {err.strerror or err}"
    except ValueError:
        return None, f"{path} is not a state file"
    try:
        age = now - float(state["written_at"])
        interval = float(state["sensing_interval_seconds"])
    except (KeyError, TypeError, ValueError):
        return None, f"{path} is not a state file"
    stale = max(_LIVE_STATE_STALE_CYCLES * interval, _LIVE_STATE_STALE_MIN_SECONDS)
    if age > stale:
        return None, f"{path} is {age:.0f} s old: the agent is not running, or stuck"
    state["age_seconds"] = round(max(age, 0.0), 1)
    return state, ""


def _status(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args)
    except ConfigError as err:
        print(f"vmtide-agent: {err}", file=sys.stderr)
        return EXIT_CONFIG
    path = config.agent.live_state_file
    if path is None:
        live, why = None, "the agent does not publish its state ([agent] publish_state = false)"
    else:
        live, why = read_live_state(path, time.time())
    if live is not None and args.json:
        print(json.dumps(live, indent=2))
        return 0
    if live is not None:
        try:
            print("\n".join(_live_lines(live)))
            return 0
        except (KeyError, TypeError, ValueError) as err:
            # Written by another version of the agent (one running since an upgrade).
            why = f"{path} has no {err} (another agent version?)"
    return _one_shot_status(args, config, why)


def _one_shot_status(args: argparse.Namespace, config: AgentConfig, why: str) -> int:
    """A fresh sample and what a fresh policy would do with it: no daemon's view."""
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
        "source": "one-shot",
        "why_not_live": why,
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
    print(f"one-shot sample with a fresh policy state ({why})")
    cpu, mem = status["cpus"], status["memory"]
    lines = _resource_lines(
        status,
        f"would hold {cpu['would']['target']}: {cpu['would']['reason']}",
        f"would hold {mem['would']['target'] // _MiB} MiB: {mem['would']['reason']}",
    )
    print("\n".join(lines))
    return 0


def _resource_lines(status: dict[str, Any], cpu_decision: str, memory_decision: str) -> list[str]:
    """The lines both views share: CPUs, memory and pressure."""
    lines = []
    cpu, mem, psi = status["cpus"], status["memory"], status["pressure"]
    cpu_limits, mem_limits = cpu["limits"], mem["limits"]
    busy = "" if cpu["busy"] is None else f"; busy {cpu['busy']:.2f}"
    lines.append(
        f"cpus    {cpu['online']} online of {cpu['present']} present, {cpu['possible']} possible;"
        f" standby {cpu['standby'] or 'none'}{busy}"
    )
    lines.append(
        f"        limits {cpu_limits['minimum']}-{cpu_limits['maximum']}"
        f" (burst {cpu_limits['burst']}); {cpu_decision}"
    )
    available = (
        ""
        if mem["available_bytes"] is None
        else f"; available {mem['available_bytes'] // _MiB} MiB"
    )
    lines.append(
        f"memory  {mem['online_bytes'] // _MiB} MiB online ({mem['movable_online_bytes'] // _MiB}"
        f" MiB movable), {len(mem['standby_blocks'])} standby blocks of"
        f" {mem['block_size_bytes'] // _MiB} MiB{available};"
        f" auto_online_blocks={mem['auto_online_blocks']}"
    )
    lines.append(
        f"        limits {mem_limits['minimum'] // _MiB}-{mem_limits['maximum'] // _MiB} MiB"
        f" (burst {mem_limits['burst'] // _MiB} MiB); {memory_decision}"
    )
    if psi["available"]:
        lines.append(
            f"psi     cpu some {psi['cpu_some']:.1f}%, memory some {psi['memory_some']:.1f}%"
            f" full {psi['memory_full']:.1f}%, io some {psi['io_some']:.1f}%"
        )
    else:
        lines.append("psi     not available on this kernel (sampling only)")
    return lines


def _decision_text(decision: dict[str, Any] | None) -> str:
    # A reason names the resource and the move ("cpu 2->3: busy ...").
    return "decision: none yet" if decision is None else f"decision: {decision['reason']}"


def _live_lines(state: dict[str, Any]) -> list[str]:
    """The running daemon's view; built whole, so a state file it cannot read
    (another agent version) prints nothing rather than half."""
    lines = []
    broker = state["broker"]
    lines.append(
        f"agent   pid {state['pid']}, guest {state['guest_id']!r};"
        f" live state {state['age_seconds']:.1f} s old"
    )
    granted = state["entitlement"]
    entitlement = (
        f"may hold {granted['cpus']} cpus, {granted['memory_bytes'] // _MiB} MiB"
        if granted
        else "no grant yet (keeps what it has)"
    )
    if not broker["enabled"]:
        lines.append(
            "broker  none (standalone: the guest keeps its size, onlines what is hot-added)"
        )
    elif broker["connected"]:
        lines.append(
            f"broker  connected to {broker['target']}, session {broker['session_id']}"
            f" ({broker['reconnects']} reconnects); {entitlement}"
        )
    else:
        lines.append(
            f"broker  not connected to {broker['target']}"
            f" ({broker['reconnects']} reconnects); {entitlement}"
        )
    lines += _resource_lines(
        state,
        _decision_text(state["cpus"]["decision"]),
        _decision_text(state["memory"]["decision"]),
    )
    request = state["last_request"]
    if request is not None:
        ago = max(0.0, state["written_at"] - request["at"])
        lines.append(
            f"request {request['request_id']}, {ago:.0f} s ago: {request['cpus']} cpus,"
            f" {request['memory_bytes'] // _MiB} MiB ({request['urgency']}): {request['reason']}"
        )
    pending = state["pending"]
    parts = []
    if pending["acting"] is not None:
        parts.append(f"{pending['acting']['what']} for {pending['acting']['seconds']:.1f} s")
    short = pending["granted_not_online"]
    if short and (short["cpus"] or short["memory_bytes"]):
        parts.append(
            f"granted but not online: {short['cpus']} cpus, {short['memory_bytes'] // _MiB} MiB"
        )
    lines.append(f"pending {'; '.join(parts) or 'nothing'}")
    for index, decision in enumerate(reversed(state["recent_decisions"])):
        when = time.strftime("%H:%M:%S", time.localtime(decision["at"]))
        lines.append(f"{'recent' if index == 0 else '':<8}{when} {decision['reason']}")
    errors = state["cycle_errors"]
    if errors["expected"] or errors["unexpected"]:
        lines.append(
            f"errors  {errors['expected']} sensing cycles failed reading sysfs or procfs,"
            f" {errors['unexpected']} on a bug (see the journal)"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
