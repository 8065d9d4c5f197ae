"""Draw the Grafana dashboard's panels from real Prometheus data: docs/grafana-dashboard.png.

This is not a Grafana screenshot (Grafana is not installed here). A real broker and a
real agent run on a simulated guest (tests/prom_helpers.py) through a load pattern,
a real Prometheus scrapes them every second, and then every panel of
packaging/grafana/vmtide.json is drawn with matplotlib from its own queries over
that time range, in the dashboard's grid layout, with its legends, units, stacking
and dashed lines.

    .venv/bin/pip install matplotlib        # not a project dependency
    .venv/bin/python packaging/grafana/render.py [--out FILE] [--quick]

About four and a half minutes (`--quick`: half that), most of it the load pattern running in real
time: PSI averages and the policy's windows are in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import matplotlib  # noqa: E402  (after the paths above)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from prom_helpers import (  # noqa: E402
    GiB,
    MiB,
    StackConfig,
    promql,
    promql_range,
    running_prometheus,
    running_stack,
)

from vmtide.fakesys import Load  # noqa: E402

DASHBOARD = HERE / "vmtide.json"
OUT = REPO / "docs" / "grafana-dashboard.png"
# Grafana's $__rate_interval is at least four scrape intervals; at 1 s scrapes
# that is jumpy, so the picture uses a little more.
RATE_INTERVAL = "10s"
STEP_SECONDS = 2
SETTLE_SECONDS = 5  # the last scrapes of the pattern reach Prometheus

# Grafana's grid: 24 columns; a height unit is 30 px against a ~66 px column.
FIGURE_WIDTH_INCHES = 20.0
COLUMN_INCHES = FIGURE_WIDTH_INCHES / 24
ROW_INCHES = COLUMN_INCHES * 30 / 66
HEADER_INCHES = 1.0
DPI = 80


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    load: Load


# Two rounds of growth: the grow-latency histogram's series appear with the first
# grow of each resource, so only a later grow shows in its rate().
PHASES = (
    Phase("idle", 20, Load(cpus=0.3, memory_bytes=400 * MiB)),
    Phase("CPU burst", 50, Load(cpus=3.4, memory_bytes=500 * MiB)),
    Phase("memory growth", 50, Load(cpus=0.7, memory_bytes=1800 * MiB)),
    Phase("idle", 60, Load(cpus=0.3, memory_bytes=400 * MiB)),
    Phase("both", 40, Load(cpus=2.5, memory_bytes=1400 * MiB)),
    Phase("idle", 40, Load(cpus=0.3, memory_bytes=400 * MiB)),
)

# Short shrink windows, as in the simulated demo, so the guest gives back within
# the picture; production defaults wait minutes (docs/policy.md).
AGENT_POLICY = """
[policy.cpu]
shrink_window_seconds = {window}
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0

[policy.memory]
shrink_window_seconds = {window}
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0
headroom_min_bytes = "128MiB"
headroom_percent = 5.0
"""


def pattern(phases: Sequence[Phase]) -> Callable[[float], Load]:
    def load(seconds: float) -> Load:
        for phase in phases:
            if seconds < phase.seconds:
                return phase.load
            seconds -= phase.seconds
        return phases[-1].load

    return load


# ------------------------------------------------------------------ drawing


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


@dataclass(frozen=True)
class Unit:
    scale: float
    label: str


UNITS = {
    "bytes": Unit(1 / GiB, "GiB"),
    "percentunit": Unit(100, "%"),
    "opm": Unit(1, "per minute"),
    "s": Unit(1, "seconds"),
    "short": Unit(1, ""),
}


def style_for(panel: dict[str, Any], name: str) -> dict[str, Any]:
    """The panel's overrides that apply to a series: dashed, colour, not stacked."""
    style: dict[str, Any] = {}
    for override in panel["fieldConfig"].get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byName":
            hit = matcher["options"] == name
        elif matcher["id"] == "byRegexp":
            hit = re.fullmatch(matcher["options"], name) is not None
        else:
            hit = False
        if not hit:
            continue
        for prop in override["properties"]:
            if prop["id"] == "custom.lineStyle" and prop["value"].get("fill") == "dash":
                style["linestyle"] = "--"
            elif prop["id"] == "color" and prop["value"].get("mode") == "fixed":
                style["color"] = prop["value"]["fixedColor"]
            elif prop["id"] == "custom.stacking":
                style["unstacked"] = prop["value"].get("mode") == "none"
    return style


@dataclass(frozen=True)
class Series:
    name: str
    times: list[float]  # minutes since the start
    values: list[float]


def fetch(base: str, panel: dict[str, Any], guest: str, start: float, end: float) -> list[Series]:
    found = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$guest", guest)
        for item in promql_range(base, expr, start, end, STEP_SECONDS):
            points = [(float(t), float(v)) for t, v in item["values"]]
            found.append(
                Series(
                    legend(target.get("legendFormat", ""), item["metric"]) or expr,
                    [(t - start) / 60 for t, _ in points],
                    [v for _, v in points],
                )
            )
    return found


def draw_timeseries(
    ax: Axes, panel: dict[str, Any], series: list[Series], span: float, phases: Sequence[Phase]
) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = UNITS.get(defaults.get("unit", "short"), UNITS["short"])
    stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
    base: dict[float, float] = {}
    for index, item in enumerate(series):
        style = style_for(panel, item.name)
        values = [v * unit.scale for v in item.values]
        line = {k: style[k] for k in ("linestyle", "color") if k in style}
        if stacked and not style.get("unstacked"):
            below = [base.get(t, 0.0) for t in item.times]
            above = [b + (0.0 if math.isnan(v) else v) for b, v in zip(below, values, strict=True)]
            ax.fill_between(item.times, below, above, step="post", alpha=0.35, label=item.name)
            base.update(zip(item.times, above, strict=True))
        else:
            # Earlier series drawn wider: equal lines (online = granted) stay visible.
            width = max(1.2, 3.6 - 0.45 * index)
            ax.plot(
                item.times, values, drawstyle="steps-post", linewidth=width, label=item.name, **line
            )
    boundary = 0.0
    for phase in phases:  # the load pattern's phases, as dotted lines
        ax.axvline(boundary / 60, color="grey", linestyle=":", linewidth=0.8)
        ax.text(
            boundary / 60 + 0.02,
            0.98,
            phase.name,
            transform=ax.get_xaxis_transform(),
            fontsize=6,
            color="grey",
            va="top",
        )
        boundary += phase.seconds
    ax.set_xlim(0, span)
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"] * unit.scale)
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"] * unit.scale * 1.05)
    ax.set_ylabel(unit.label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=6.5, loc="upper left", ncol=2, framealpha=0.7)
    else:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes)


def draw_stat(ax: Axes, panel: dict[str, Any], value: float | None) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    text, colour = "No data", "lightgrey"
    if value is not None and math.isfinite(value):
        text = f"{value * 100:.0f} %" if defaults.get("unit") == "percentunit" else f"{value:g}"
        steps = defaults.get("thresholds", {}).get("steps", [])
        for step in steps:
            if step["value"] is None or value >= step["value"]:
                colour = step["color"]
        for mapping in defaults.get("mappings", []):
            hit = mapping.get("options", {}).get(f"{value:g}")
            if hit:
                text, colour = hit["text"], hit.get("color", colour)
    ax.set_facecolor(colour)
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=15, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def render(
    base: str, guest: str, start: float, phases: Sequence[Phase], out: Path, note: str
) -> None:
    end = start + sum(p.seconds for p in phases)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = HEADER_INCHES + rows * ROW_INCHES
    figure: Figure = plt.figure(figsize=(FIGURE_WIDTH_INCHES, height), dpi=DPI)
    figure.text(
        0.01,
        1 - 0.3 / height,
        "vmtide dashboard (packaging/grafana/vmtide.json): its panels' queries drawn with"
        " matplotlib from a real Prometheus. Not a Grafana screenshot.",
        fontsize=13,
        weight="bold",
        va="center",
    )
    figure.text(
        0.01, 1 - 0.62 / height, textwrap.fill(note, 230), fontsize=9, va="center", color="dimgray"
    )
    span = (end - start) / 60
    margin = 0.12  # inches inside each cell: titles, ticks

    for panel in panels:
        grid = panel["gridPos"]
        left = grid["x"] * COLUMN_INCHES / FIGURE_WIDTH_INCHES
        width = grid["w"] * COLUMN_INCHES / FIGURE_WIDTH_INCHES
        top = HEADER_INCHES + grid["y"] * ROW_INCHES
        title = panel["title"].replace("$guest", guest)
        if panel["type"] == "row":
            figure.text(
                left + 0.005,
                1 - (top + ROW_INCHES / 2) / height,
                title,
                fontsize=12,
                weight="bold",
                va="center",
            )
            continue
        cell = grid["h"] * ROW_INCHES
        bottom = 1 - (top + cell) / height
        ax = figure.add_axes(
            (
                left + 0.5 / FIGURE_WIDTH_INCHES,
                bottom + 0.35 / height,
                width - 0.65 / FIGURE_WIDTH_INCHES,
                (cell - 0.35 - 0.3 - margin) / height,
            )
        )
        ax.set_title(title, fontsize=9, loc="left", weight="bold")
        if panel["type"] == "stat":
            expr = panel["targets"][0]["expr"].replace("$guest", guest)
            found = promql(base, expr)
            draw_stat(ax, panel, float(found[0]["value"][1]) if found else None)
        else:
            draw_timeseries(ax, panel, fetch(base, panel, guest, start, end), span, phases)
            ax.set_xlabel("minutes", fontsize=7, labelpad=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT.relative_to(REPO)}")
    parser.add_argument("--quick", action="store_true", help="the load pattern at half length")
    args = parser.parse_args(argv)
    speed = 2.0 if args.quick else 1.0
    phases = tuple(Phase(p.name, p.seconds / speed, p.load) for p in PHASES)
    window = 20.0 / speed
    config = StackConfig(
        possible_cpus=4,
        boot_cpus=1,
        boot_blocks=8,
        pool_cpus=4,
        pool_memory=4 * GiB,
        max_memory=3 * GiB,
        # A maximum below the possible CPUs and a burst above it: the limits'
        # lines apart, and the CPU burst phase pressed against the maximum.
        agent_max_cpus=3,
        agent_burst_cpus=4,
        load=pattern(phases),
        agent_extra=AGENT_POLICY.format(window=window),
    )
    with tempfile.TemporaryDirectory(prefix="vmtide-render-") as tmp:
        work = Path(tmp)
        (work / "stack").mkdir()
        (work / "prometheus").mkdir()
        with running_stack(work / "stack", config) as stack:
            start = time.time() - (time.monotonic() - stack.started)
            with running_prometheus(
                work / "prometheus", stack, agent_labels={"guest": stack.guest_id}
            ) as base:
                end = start
                for phase in phases:
                    print(f"{phase.name}: {phase.seconds:.0f} s", flush=True)
                    end += phase.seconds
                    time.sleep(max(0.0, end - time.time()))
                time.sleep(SETTLE_SECONDS)
                described = ", ".join(
                    f"{p.name} ({p.load.cpus:g} CPUs, {p.load.memory_bytes // MiB} MiB)"
                    for p in phases
                )
                note = (
                    f"One simulated guest ({stack.guest_id}: 4 possible CPUs, 1 booted, 1 GiB;"
                    f" limits 1-3 CPUs, burst 4, 1-3 GiB),"
                    f" the real agent and broker, a real Prometheus scraping every second."
                    f" Load over {(end - start) / 60:.1f} minutes: {described}."
                    f" Shrink windows {window:g} s (production: minutes);"
                    f" $__rate_interval = {RATE_INTERVAL}."
                )
                render(base, stack.guest_id, start, phases, args.out, note)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
