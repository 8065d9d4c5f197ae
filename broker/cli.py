"""vmtide-broker: run the host broker, show its state, check a config file."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import config as broker_config
from broker.backend import Backend
from broker.config import BrokerConfig, ConfigError, GuestConfig
from vmtide import __version__
from vmtide.logs import setup_logging

if TYPE_CHECKING:
    from vmtide.relay import VsockTransport

log = logging.getLogger("vmtide.broker")
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG; the unit does not restart on it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmtide-broker",
        description="Arbitrate host CPUs and memory among guests running vmtide-agent.",
    )
    parser.add_argument("--version", action="version", version=f"vmtide-broker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the broker")
    run.add_argument("--config", type=Path, default=broker_config.DEFAULT_PATH)
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    run.set_defaults(handler=_run)
    status = sub.add_parser("status", help="per guest: limits, granted, online, pending")
    status.add_argument("--config", type=Path, default=broker_config.DEFAULT_PATH)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=_check)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args.handler(args)
    return result


def _check(args: argparse.Namespace) -> int:
    try:
        broker_config.load(args.file)
    except ConfigError as err:
        print(f"vmtide-broker: {err}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def make_backend(guest: GuestConfig) -> Backend:
    """The guest's backend, not connected yet: a QMP one is supervised (serve()
    connects it, and again whenever QEMU goes away)."""
    if guest.backend == "simulated":
        from broker.simulated import SimulatedBackend
        from vmtide.fakesys import FakeGuest

        assert guest.simulated_root is not None
        return SimulatedBackend(FakeGuest.open(guest.simulated_root), guest.id)
    from broker.qmp_backend import QmpBackend, QmpBackendOptions
    from broker.supervisor import SupervisedBackend

    assert guest.qmp_socket is not None
    qmp = QmpBackend(
        guest.qmp_socket, guest.id, QmpBackendOptions(memory_step_bytes=guest.memory_step_bytes)
    )
    return SupervisedBackend(qmp, guest.id, str(guest.qmp_socket))


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = broker_config.load(args.config)
    except ConfigError as err:
        print(f"vmtide-broker: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.metrics_port is not None:
        import dataclasses

        config = dataclasses.replace(
            config, broker=dataclasses.replace(config.broker, metrics_port=args.metrics_port)
        )
    try:
        return asyncio.run(serve(config))
    except OSError as err:
        log.error("%s", err)
        return 1


async def serve(
    config: BrokerConfig,
    stop: asyncio.Event | None = None,
    vsock: VsockTransport | None = None,
) -> int:
    """Run the broker until `stop` (or a signal); `vsock` replaces the real
    AF_VSOCK sockets (tests)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from broker.core import Broker
    from broker.metrics import BrokerMetrics
    from broker.server import ListenError, start_servers, stop_servers
    from broker.supervisor import SupervisedBackend
    from vmtide.notify import SystemdNotifier

    backends = {guest.id: make_backend(guest) for guest in config.guests}
    supervised = {g: b for g, b in backends.items() if isinstance(b, SupervisedBackend)}
    keepers: list[asyncio.Task[None]] = []
    own_stop = asyncio.Event()  # ends the keepers however serve() ends
    try:
        # One unreachable QEMU must not keep the broker from serving the others:
        # a failed attempt is logged, and its guest waits for the next one.
        await asyncio.gather(*(b.connect() for b in supervised.values()))
        registry = CollectorRegistry()
        broker = Broker(config, backends, BrokerMetrics(registry))
        await broker.load_plugged()
        for guest_id, supervisor in supervised.items():
            keeper = supervisor.run(
                own_stop,
                functools.partial(broker.backend_up, guest_id),
                functools.partial(broker.backend_down, guest_id),
            )
            keepers.append(asyncio.create_task(keeper, name=f"qmp-{guest_id}"))
        try:
            servers = await start_servers(broker, config, vsock)
        except ListenError as err:
            log.error("%s", err)
            return 1
        if config.broker.metrics_port:
            start_http_server(
                config.broker.metrics_port, config.broker.metrics_address, registry=registry
            )
        if stop is None:  # the daemon itself: stop on a signal
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        # What start-up built (config, books, servers) lives as long as the
        # process: out of the collector's sight, a full collection walks only
        # what came since (measured: the longest pause at 1,000 guests fell
        # from 246 to 106 ms, bench/broker_scale.py).
        gc.freeze()
        notifier = SystemdNotifier()
        notifier("READY=1")
        log.info("vmtide-broker %s serving %d guests", __version__, len(config.guests))
        broker.write_state()
        try:
            await broker.run(stop)
        finally:
            notifier("STOPPING=1")
            await stop_servers(servers)
            broker.write_state()
    finally:
        own_stop.set()
        await asyncio.gather(*keepers, return_exceptions=True)
        for backend in backends.values():
            await backend.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        config = broker_config.load(args.config)
    except ConfigError as err:
        print(f"vmtide-broker: {err}", file=sys.stderr)
        return EXIT_CONFIG
    path = config.broker.state_file
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError) as err:
        print(f"vmtide-broker: no state at {path} ({err}); is the broker running?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    mib = 1 << 20
    pool = state["pool"]
    print(
        f"pool: {pool['allocated']['cpus']}/{pool['capacity']['cpus']} cpus, "
        f"{pool['allocated']['memory_bytes'] // mib}/{pool['capacity']['memory_bytes'] // mib} MiB"
        f" allocated (state {age:.0f} s old)"
    )
    print(
        f"{'guest':<16}{'conn':<6}{'prio':>5}  {'cpus min/max/burst':<20}"
        f"{'granted':>8}{'online':>8}"
        f"{'wants':>7}  {'memory MiB min/max/burst':<26}{'granted/online/wants':<22}"
        f"{'pending':>8}  hypervisor"
    )
    down = []
    for name, g in state["guests"].items():
        limits = g["limits"]
        cpu_limits = (
            f"{limits['minimum']['cpus']}/{limits['maximum']['cpus']}/{limits['burst']['cpus']}"
        )
        memory_limits = "/".join(
            str(limits[kind]["memory_bytes"] // mib) for kind in ("minimum", "maximum", "burst")
        )
        memory = (
            f"{g['granted']['memory_bytes'] // mib}/{g['online']['memory_bytes'] // mib}/"
            f"{g['requested']['memory_bytes'] // mib}"
        )
        # A state file from before these fields: say nothing rather than guess.
        backend = g.get("backend", {})
        hypervisor = {True: "ok", False: "UNREACHABLE"}.get(backend.get("available"), "?")
        if backend.get("available") is False:
            down.append(f"{name}: {backend.get('error') or 'unreachable'}")
        if g.get("balloon_bytes"):
            hypervisor += f", balloon {g['balloon_bytes'] // mib} MiB"
        print(
            f"{name:<16}{'yes' if g['connected'] else 'no':<6}{g['priority']:>5}  {cpu_limits:<20}"
            f"{g['granted']['cpus']:>8}{g['online']['cpus']:>8}{g['requested']['cpus']:>7}  "
            f"{memory_limits:<26}{memory:<22}{len(g['pending_reclaims']):>8}  {hypervisor}"
        )
    for line in down:
        print(f"hypervisor unreachable, {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
