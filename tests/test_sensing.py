"""Tests for agent.sensing: parsers, Sensor deltas and fallbacks, PressureWatch.

Fake procfs trees hold what real kernels print (copied from 5.4, 5.15 and 6.x
guests, with the long `intr` line shortened). A second group reads this
machine's real /proc read-only and checks the values are sane.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from agent.sensing import (
    CpuJiffies,
    PressureWatch,
    ProcParseError,
    Psi,
    PsiLine,
    Sensor,
    parse_meminfo,
    parse_psi,
    parse_stat,
    parse_vmstat,
)

LOGGER = "vmtide.agent.sensing"
REAL_PROC = Path("/proc")
HAVE_REAL_PSI = (REAL_PROC / "pressure" / "cpu").exists()
# Bit 24 of CapEff: without it the kernel takes the unprivileged trigger path.
CAP_SYS_RESOURCE_BIT = 24
# Generous: only bounds how long a broken test hangs, never how long a pass takes.
REAL_LOAD_DEADLINE_SECONDS = 20.0

# --- fake /proc contents -------------------------------------------------------

# Linux 5.13+ prints a cpu `full` line, all zeros at system level.
CPU_PSI = (
    "some avg10=1.52 avg60=0.80 avg300=0.20 total=6260378\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)
# Linux 5.4: no cpu `full` line.
CPU_PSI_5_4 = "some avg10=0.00 avg60=0.03 avg300=0.05 total=1130547\n"
MEMORY_PSI = (
    "some avg10=12.50 avg60=4.10 avg300=1.02 total=58000312\n"
    "full avg10=6.25 avg60=2.00 avg300=0.51 total=31000457\n"
)
IO_PSI = (
    "some avg10=0.31 avg60=0.05 avg300=0.26 total=3266258\n"
    "full avg10=0.11 avg60=0.04 avg300=0.24 total=2987099\n"
)

MEMINFO = """\
MemTotal:        4028440 kB
MemFree:         2712632 kB
MemAvailable:    3364588 kB
Buffers:           54300 kB
Cached:           736548 kB
SwapCached:            0 kB
Active:           487396 kB
Inactive:         610960 kB
Active(anon):       2064 kB
Inactive(anon):   317912 kB
Active(file):     485332 kB
Inactive(file):   293048 kB
Unevictable:           0 kB
Mlocked:               0 kB
SwapTotal:       2097148 kB
SwapFree:        2097148 kB
Dirty:                 8 kB
Writeback:             0 kB
AnonPages:        307556 kB
Mapped:           205732 kB
Shmem:             12468 kB
KReclaimable:      61604 kB
Slab:             122412 kB
SReclaimable:      61604 kB
SUnreclaim:        60808 kB
KernelStack:        4368 kB
PageTables:         6032 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:     4111368 kB
Committed_AS:    1640900 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       14800 kB
VmallocChunk:          0 kB
Percpu:             1520 kB
HardwareCorrupted:     0 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:         0 kB
FilePmdMapped:         0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:      126840 kB
DirectMap2M:     4067328 kB
"""

KIB = 1024


def stat_text(cpus: dict[int, Sequence[int]], procs_running: int = 3) -> str:
    """A /proc/stat whose aggregate line sums the given cpuN lines."""
    aggregate = [sum(column) for column in zip(*cpus.values(), strict=True)]
    lines = ["cpu  " + " ".join(map(str, aggregate))]
    lines += [f"cpu{n} " + " ".join(map(str, times)) for n, times in cpus.items()]
    lines += [
        "intr 244156 22 9 0 0 0 0 0 0 0 0 0 0 156 0 0 0 0 0 0 0 0 0 0 0 1 1 8 0 0 0 0",
        "ctxt 412273",
        "btime 1732520000",
        "processes 3121",
        f"procs_running {procs_running}",
        "procs_blocked 0",
        "softirq 170455 0 25634 2 3069 10937 0 49 71284 0 59480",
    ]
    return "\n".join(lines) + "\n"


def vmstat_text(pswpin: int, pswpout: int) -> str:
    return (
        "nr_free_pages 678158\n"
        "nr_zone_inactive_anon 79478\n"
        "nr_zone_active_anon 516\n"
        "nr_dirty 2\n"
        f"pswpin {pswpin}\n"
        f"pswpout {pswpout}\n"
        "pgpgin 1123416\n"
        "pgpgout 401244\n"
        "pgfault 2741107\n"
        "pgmajfault 3121\n"
        "oom_kill 0\n"
    )


# user nice system idle iowait irq softirq steal guest guest_nice
CPU0_T0 = (1000, 0, 500, 8000, 300, 0, 100, 100, 0, 0)
CPU1_T0 = (2000, 10, 700, 7000, 100, 20, 50, 20, 400, 0)


def make_procfs(
    root: Path,
    *,
    stat: str | None = None,
    meminfo: str = MEMINFO,
    vmstat: str | None = None,
    pressure: dict[str, str] | None = None,
) -> Path:
    """Write a fake procfs under root; pressure=None leaves out /proc/pressure."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(stat or stat_text({0: CPU0_T0, 1: CPU1_T0}))
    (root / "meminfo").write_text(meminfo)
    (root / "vmstat").write_text(vmstat or vmstat_text(100, 10))
    if pressure is not None:
        (root / "pressure").mkdir(exist_ok=True)
        for name, text in pressure.items():
            (root / "pressure" / name).write_text(text)
    return root


ALL_PSI = {"cpu": CPU_PSI, "memory": MEMORY_PSI, "io": IO_PSI}


def clock(*times: float) -> Callable[[], float]:
    return iter(times).__next__


def warnings_from_sensing(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- parse_psi -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            CPU_PSI,
            Psi(PsiLine(1.52, 0.80, 0.20, 6260378), PsiLine(0.0, 0.0, 0.0, 0)),
            id="cpu-5.13-with-zero-full",
        ),
        pytest.param(
            CPU_PSI_5_4, Psi(PsiLine(0.0, 0.03, 0.05, 1130547), None), id="cpu-5.4-no-full"
        ),
        pytest.param(
            MEMORY_PSI,
            Psi(PsiLine(12.5, 4.1, 1.02, 58000312), PsiLine(6.25, 2.0, 0.51, 31000457)),
            id="memory",
        ),
        pytest.param(
            "some avg10=100.00 avg60=99.99 avg300=0.00 total=1\n\n",
            Psi(PsiLine(100.0, 99.99, 0.0, 1), None),
            id="saturated-and-blank-line",
        ),
    ],
)
def test_parse_psi(text: str, expected: Psi) -> None:
    assert parse_psi(text, "/proc/pressure/x") == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "no 'some' line", id="empty"),
        pytest.param(
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "no 'some' line", id="only-full"
        ),
        pytest.param("some avg10=0.00 avg60=0.00 avg300=0.00\n", "missing total", id="no-total"),
        pytest.param("some\n", "missing avg10, avg60, avg300, total", id="bare-kind"),
        pytest.param(
            "some avg10=x avg60=0.00 avg300=0.00 total=0\n", "is not a percentage", id="bad-avg"
        ),
        pytest.param(
            "some avg10=nan avg60=0.00 avg300=0.00 total=0\n", "is not a percentage", id="nan"
        ),
        pytest.param(
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n", "not an integer", id="bad-total"
        ),
        pytest.param(
            "some avg10 avg60=0.00 avg300=0.00 total=0\n", "is not key=value", id="no-equals"
        ),
        pytest.param(
            "half avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "unknown kind", id="bad-kind"
        ),
        pytest.param(CPU_PSI_5_4 + CPU_PSI_5_4, "second 'some' line", id="duplicate"),
    ],
)
def test_parse_psi_malformed(text: str, reason: str) -> None:
    with pytest.raises(ProcParseError, match=reason) as caught:
        parse_psi(text, "/proc/pressure/memory")
    assert caught.value.path == Path("/proc/pressure/memory")
    assert str(caught.value).startswith("/proc/pressure/memory: ")


# --- parse_stat ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "aggregate", "per_cpu", "procs_running"),
    [
        pytest.param(
            "cpu  6156 0 2166 805648 405 0 116 26 0 0\n"
            "cpu0 2141 0 788 404188 88 0 49 14 0 0\n"
            "cpu1 4015 0 1378 401460 317 0 67 12 0 0\n"
            "intr 244156 0 0 0\nctxt 412273\nbtime 1732520000\nprocesses 3121\n"
            "procs_running 1\nprocs_blocked 0\nsoftirq 170455 0 25634 2 3069\n",
            # idle + iowait + steal
            CpuJiffies(814517, 806079),
            {0: CpuJiffies(407268, 404290), 1: CpuJiffies(407249, 401789)},
            1,
            id="6.x-ten-fields",
        ),
        pytest.param(
            # guest (field 9) is already inside user: it must not count twice.
            "cpu  150 0 50 700 100 0 0 0 40 0\ncpu0 150 0 50 700 100 0 0 0 40 0\nprocs_running 2\n",
            CpuJiffies(1000, 800),
            {0: CpuJiffies(1000, 800)},
            2,
            id="guest-not-double-counted",
        ),
        pytest.param(
            "cpu  10 0 10 80 5 1 1\ncpu0 10 0 10 80 5 1 1\nprocs_running 4\n",
            CpuJiffies(107, 85),
            {0: CpuJiffies(107, 85)},
            4,
            id="2.6-seven-fields",
        ),
        pytest.param(
            "cpu  10 0 10 80\ncpu0 10 0 10 80\nprocs_running 1\n",
            CpuJiffies(100, 80),
            {0: CpuJiffies(100, 80)},
            1,
            id="2.4-four-fields",
        ),
        pytest.param(
            # cpu1 offline: the kernel prints only online CPUs.
            "cpu  20 0 0 180 0 0 0 0 0 0\ncpu0 10 0 0 90 0 0 0 0 0 0\n"
            "cpu2 10 0 0 90 0 0 0 0 0 0\nprocs_running 1\n",
            CpuJiffies(200, 180),
            {0: CpuJiffies(100, 90), 2: CpuJiffies(100, 90)},
            1,
            id="gap-in-cpu-ids",
        ),
    ],
)
def test_parse_stat(
    text: str, aggregate: CpuJiffies, per_cpu: dict[int, CpuJiffies], procs_running: int
) -> None:
    stat = parse_stat(text)
    assert stat.aggregate == aggregate
    assert dict(stat.per_cpu) == per_cpu
    assert stat.procs_running == procs_running


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "no aggregate 'cpu' line", id="empty"),
        pytest.param("cpu0 1 2 3 4\nprocs_running 1\n", "no aggregate", id="no-aggregate"),
        pytest.param("cpu  1 2 3 4\nprocs_running 1\n", "no 'cpuN' lines", id="no-per-cpu"),
        pytest.param("cpu  1 2 3 4\ncpu0 1 2 3 4\n", "no 'procs_running'", id="no-procs"),
        pytest.param("cpu  1 2 3\ncpu0 1 2 3 4\nprocs_running 1\n", "3 time fields", id="short"),
        pytest.param(
            "cpu  1 2 x 4\ncpu0 1 2 3 4\nprocs_running 1\n", "'x' is not an int", id="nan"
        ),
        pytest.param("cpu  1 2 3 4\ncpuX 1 2 3 4\nprocs_running 1\n", "bad CPU name", id="cpuX"),
        pytest.param("cpu  1 2 3 4\ncpu0 1 2 3 4\nprocs_running\n", "malformed", id="no-count"),
    ],
)
def test_parse_stat_malformed(text: str, reason: str) -> None:
    with pytest.raises(ProcParseError, match=reason) as caught:
        parse_stat(text, "/proc/stat")
    assert caught.value.path == Path("/proc/stat")


# --- parse_meminfo and parse_vmstat --------------------------------------------------


def test_parse_meminfo_converts_kib_to_bytes_and_keeps_counts() -> None:
    fields = parse_meminfo(MEMINFO)
    assert fields["MemTotal"] == 4028440 * KIB
    assert fields["MemAvailable"] == 3364588 * KIB
    assert fields["Active(anon)"] == 2064 * KIB
    assert fields["HugePages_Total"] == 0  # a count, no unit
    assert fields["Hugepagesize"] == 2048 * KIB
    # The sensing loop's selection: only those lines are read (and checked).
    picked = parse_meminfo(MEMINFO + "garbage\n", keys={"MemTotal", "SwapFree"})
    assert picked == {"MemTotal": 4028440 * KIB, "SwapFree": 2097148 * KIB}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("MemTotal 4028440 kB\n", "no 'Name:'", id="no-colon"),
        pytest.param("MemTotal:  lots kB\n", "'lots' is not an integer", id="not-int"),
        pytest.param("MemTotal:  4 MB\n", "bad value", id="unknown-unit"),
        pytest.param("MemTotal:\n", "bad value", id="no-value"),
    ],
)
def test_parse_meminfo_malformed(text: str, reason: str) -> None:
    with pytest.raises(ProcParseError, match=reason) as caught:
        parse_meminfo(text, "/proc/meminfo")
    assert caught.value.path == Path("/proc/meminfo")


def test_parse_vmstat_all_and_selected_keys() -> None:
    text = vmstat_text(7, 9)
    assert parse_vmstat(text)["pgmajfault"] == 3121
    assert parse_vmstat(text, keys={"pswpin", "pswpout"}) == {"pswpin": 7, "pswpout": 9}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("pswpin\n", "not 'name value'", id="no-value"),
        pytest.param("pswpin 1 2\n", "not 'name value'", id="two-values"),
        pytest.param("pswpin -x\n", "not an integer", id="not-int"),
    ],
)
def test_parse_vmstat_malformed(text: str, reason: str) -> None:
    with pytest.raises(ProcParseError, match=reason) as caught:
        parse_vmstat(text, "/proc/vmstat")
    assert caught.value.path == Path("/proc/vmstat")


# --- Sensor on a fake procfs ---------------------------------------------------------


def test_first_sample_has_no_deltas(tmp_path: Path) -> None:
    sensor = Sensor(make_procfs(tmp_path, pressure=ALL_PSI), clock=clock(5.0))
    reading = sensor.sample()
    assert reading.at == 5.0
    assert reading.cpu_busy == 0.0
    assert reading.per_cpu_busy == (0.0, 0.0)
    assert reading.swap_in_per_s == reading.swap_out_per_s == 0.0
    assert reading.online_cpus == 2
    assert reading.run_queue == 3
    assert reading.psi_available
    assert (reading.cpu_some, reading.memory_some, reading.memory_full) == (1.52, 12.5, 6.25)
    assert (reading.io_some, reading.io_full) == (0.31, 0.11)
    assert reading.cpu_some_total_us == 6260378
    assert (reading.memory_some_total_us, reading.memory_full_total_us) == (58000312, 31000457)
    assert (reading.io_some_total_us, reading.io_full_total_us) == (3266258, 2987099)
    assert reading.memory_total == 4028440 * KIB
    assert reading.memory_available == 3364588 * KIB
    assert reading.swap_total == reading.swap_free == 2097148 * KIB


def test_deltas_across_two_samples(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(10.0, 12.0))
    sensor.sample()
    # Over 100 jiffies: cpu0 30 busy (user +20, system +10, idle +60, iowait
    # +10); cpu1 85 busy, 40 of them guest time that is already in user, and
    # 5 stolen by the host, which is not the guest being busy.
    cpu0 = [a + b for a, b in zip(CPU0_T0, (20, 0, 10, 60, 10, 0, 0, 0, 0, 0), strict=True)]
    cpu1 = [a + b for a, b in zip(CPU1_T0, (80, 0, 5, 10, 0, 0, 0, 5, 40, 0), strict=True)]
    (root / "stat").write_text(stat_text({0: cpu0, 1: cpu1}, procs_running=7))
    (root / "vmstat").write_text(vmstat_text(pswpin=400, pswpout=60))
    (root / "pressure" / "memory").write_text(MEMORY_PSI.replace("12.50", "40.00"))

    reading = sensor.sample()
    assert reading.at == 12.0
    assert reading.per_cpu_busy == pytest.approx((0.3, 0.85))
    assert reading.cpu_busy == pytest.approx((30 + 85) / 200 * 2)
    assert reading.run_queue == 7
    assert reading.swap_in_per_s == pytest.approx(300 / 2.0)
    assert reading.swap_out_per_s == pytest.approx(50 / 2.0)
    assert reading.memory_some == 40.0


def test_cpu_hotplug_between_samples(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(1.0, 2.0))
    sensor.sample()
    # cpu1 went offline and cpu2 came online: cpu2 has no baseline yet.
    cpu0 = [a + b for a, b in zip(CPU0_T0, (50, 0, 0, 50, 0, 0, 0, 0, 0, 0), strict=True)]
    (root / "stat").write_text(stat_text({0: cpu0, 2: (5, 0, 5, 90, 0, 0, 0, 0, 0, 0)}))
    reading = sensor.sample()
    assert reading.online_cpus == 2
    assert reading.per_cpu_busy == (0.5, 0.0)


def advanced(times: Sequence[int], busy: int, idle: int) -> list[int]:
    """`times` after `busy` jiffies of user time and `idle` of idle time."""
    return [times[0] + busy, *times[1:3], times[3] + idle, *times[4:]]


def test_a_sample_right_after_another_measures_busy_over_the_minimum_span(
    tmp_path: Path,
) -> None:
    # A PSI trigger wakes the agent 5 ms after its periodic sample: the one
    # tick in between is the agent's own. Measured from that sample alone, the
    # idle guest would read 100 % busy.
    root = make_procfs(tmp_path, stat=stat_text({0: CPU0_T0}), pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(10.0, 11.0, 11.005, 12.005))
    sensor.sample()
    cpu0 = advanced(CPU0_T0, busy=10, idle=90)
    (root / "stat").write_text(stat_text({0: cpu0}))
    assert sensor.sample().cpu_busy == pytest.approx(0.1)
    cpu0 = advanced(cpu0, busy=1, idle=0)
    (root / "stat").write_text(stat_text({0: cpu0}))
    woken = sensor.sample()
    assert woken.cpu_busy == pytest.approx(11 / 101)  # since 10.0, not 11.0
    assert woken.per_cpu_busy == pytest.approx((11 / 101,))
    # The next periodic sample is a second after the woken one: that is its baseline.
    cpu0 = advanced(cpu0, busy=50, idle=50)
    (root / "stat").write_text(stat_text({0: cpu0}))
    assert sensor.sample().cpu_busy == pytest.approx(0.5)


def test_rates_use_the_same_baseline_as_busy(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(1.0, 1.1, 1.2))
    sensor.sample()
    (root / "vmstat").write_text(vmstat_text(pswpin=200, pswpout=10))
    assert sensor.sample().swap_in_per_s == pytest.approx(100 / 0.1)
    # Nothing swapped in since 1.1, but 1.1 is too recent to be the baseline.
    assert sensor.sample().swap_in_per_s == pytest.approx(100 / 0.2)


def test_a_storm_of_samples_keeps_a_bounded_history(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, stat=stat_text({0: CPU0_T0}), pressure=ALL_PSI)
    times = [1.0 + i * 0.001 for i in range(1000)]
    sensor = Sensor(root, clock=clock(*times))
    for _ in times:
        assert 0.0 <= sensor.sample().cpu_busy <= 1.0
    assert len(sensor._baselines) <= 8


def test_total_cpu_time_comes_through_psutil_from_the_configured_root(tmp_path: Path) -> None:
    # Two guests' trees in one process: each Sensor reads its own, and the
    # rest of the process keeps psutil on the real /proc.
    busy_root = make_procfs(tmp_path / "busy", pressure=ALL_PSI)
    idle_root = make_procfs(tmp_path / "idle", pressure=ALL_PSI)
    busy, idle = Sensor(busy_root, clock=clock(1.0, 2.0)), Sensor(idle_root, clock=clock(1.0, 2.0))
    busy.sample()
    idle.sample()
    step = (60, 0, 20, 20, 0, 0, 0, 0, 0, 0)  # 80 of 100 jiffies busy on each CPU
    cpus: dict[int, Sequence[int]] = {
        n: [a + b for a, b in zip(t, step, strict=True)] for n, t in ((0, CPU0_T0), (1, CPU1_T0))
    }
    (busy_root / "stat").write_text(stat_text(cpus))
    (idle_root / "stat").write_text(stat_text({0: CPU0_T0, 1: CPU1_T0}))  # no time passed
    assert busy.sample().cpu_busy == pytest.approx(1.6)
    assert idle.sample().cpu_busy == 0.0
    assert psutil.PROCFS_PATH == "/proc"
    assert psutil.cpu_count() == os.cpu_count()


def test_an_aggregate_line_psutil_cannot_read_names_the_file(tmp_path: Path) -> None:
    # parse_stat takes Linux 2.4's four fields; psutil wants this kernel's count.
    root = make_procfs(tmp_path, stat=stat_text({0: CPU0_T0[:4], 1: CPU1_T0[:4]}), pressure=ALL_PSI)
    with pytest.raises(ProcParseError, match="line 1: bad aggregate cpu line") as caught:
        Sensor(root, clock=clock(1.0)).sample()
    assert caught.value.path == root / "stat"
    assert psutil.PROCFS_PATH == "/proc"  # restored on the error path too


def test_iowait_going_backwards_is_clamped(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(1.0, 2.0))
    sensor.sample()
    # NO_HZ kernels can report iowait lower than before; busy stays <= 1.
    cpu0 = [a + b for a, b in zip(CPU0_T0, (30, 0, 0, 0, -10, 0, 0, 0, 0, 0), strict=True)]
    (root / "stat").write_text(stat_text({0: cpu0, 1: CPU1_T0}))
    reading = sensor.sample()
    assert reading.per_cpu_busy == (1.0, 0.0)
    assert 0.0 <= reading.cpu_busy <= reading.online_cpus


def test_same_timestamp_gives_zero_rates(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    sensor = Sensor(root, clock=clock(3.0, 3.0))
    sensor.sample()
    (root / "vmstat").write_text(vmstat_text(pswpin=500, pswpout=500))
    reading = sensor.sample()
    assert reading.swap_in_per_s == reading.swap_out_per_s == 0.0


def test_no_psi_falls_back_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sensor = Sensor(make_procfs(tmp_path, pressure=None), clock=clock(1.0, 2.0, 3.0))
    readings = [sensor.sample() for _ in range(3)]
    for reading in readings:
        assert not reading.psi_available
        psi = (reading.cpu_some, reading.memory_some, reading.memory_full)
        assert (*psi, reading.io_some, reading.io_full) == (0.0,) * 5
        assert reading.memory_some_total_us == 0
        assert reading.memory_total == 4028440 * KIB  # the rest still sampled
    records = warnings_from_sensing(caplog)
    assert len(records) == 1
    assert "PSI unavailable" in records[0].getMessage()


def test_unreadable_pressure_file_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    root = make_procfs(tmp_path, pressure={"cpu": CPU_PSI, "io": IO_PSI})
    (root / "pressure" / "memory").mkdir()  # reading it fails with EISDIR
    sensor = Sensor(root, clock=clock(1.0, 2.0))
    assert not sensor.sample().psi_available
    # Recovers once the file reads again; still only one warning ever.
    (root / "pressure" / "memory").rmdir()
    (root / "pressure" / "memory").write_text(MEMORY_PSI)
    assert sensor.sample().psi_available
    assert len(warnings_from_sensing(caplog)) == 1


def test_cpu_pressure_without_full_line(tmp_path: Path) -> None:
    pressure = {"cpu": CPU_PSI_5_4, "memory": MEMORY_PSI, "io": IO_PSI}
    reading = Sensor(make_procfs(tmp_path, pressure=pressure), clock=clock(1.0)).sample()
    assert reading.psi_available
    assert reading.cpu_some_total_us == 1130547


def test_malformed_pressure_names_the_file(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure={**ALL_PSI, "io": "some avg10=oops\n"})
    with pytest.raises(ProcParseError) as caught:
        Sensor(root, clock=clock(1.0)).sample()
    assert caught.value.path == root / "pressure" / "io"


def test_missing_stat_names_the_file(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, pressure=ALL_PSI)
    (root / "stat").unlink()
    with pytest.raises(ProcParseError, match="unreadable") as caught:
        Sensor(root, clock=clock(1.0)).sample()
    assert caught.value.path == root / "stat"


def test_meminfo_without_memtotal_names_the_file(tmp_path: Path) -> None:
    root = make_procfs(tmp_path, meminfo="MemFree:  100 kB\n", pressure=ALL_PSI)
    with pytest.raises(ProcParseError, match="no MemTotal") as caught:
        Sensor(root, clock=clock(1.0)).sample()
    assert caught.value.path == root / "meminfo"


def test_memavailable_estimated_before_3_14(tmp_path: Path) -> None:
    meminfo = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"
    root = make_procfs(tmp_path, meminfo=meminfo, vmstat="nr_free_pages 25\n", pressure=ALL_PSI)
    reading = Sensor(root, clock=clock(1.0)).sample()
    assert reading.memory_available == 420 * KIB
    assert reading.swap_total == reading.swap_free == 0
    assert reading.swap_in_per_s == 0.0


# --- against this machine's real /proc (read-only) -----------------------------------


def test_real_proc_parsers() -> None:
    stat = parse_stat((REAL_PROC / "stat").read_text())
    assert 1 <= len(stat.per_cpu) <= (os.cpu_count() or 1)
    assert stat.procs_running >= 1  # this test is running
    assert stat.aggregate.total >= max(c.total for c in stat.per_cpu.values())
    meminfo = parse_meminfo((REAL_PROC / "meminfo").read_text())
    assert meminfo["MemTotal"] == psutil.virtual_memory().total
    assert 0 < meminfo["MemAvailable"] <= meminfo["MemTotal"]
    vmstat = parse_vmstat((REAL_PROC / "vmstat").read_text())
    assert vmstat["pswpin"] >= 0
    if HAVE_REAL_PSI:
        for resource in ("cpu", "memory", "io"):
            psi = parse_psi((REAL_PROC / "pressure" / resource).read_text())
            assert 0.0 <= psi.some.avg10 <= 100.0
            assert psi.some.total_us >= 0


def test_real_proc_sensor_sees_this_process_burn_cpu() -> None:
    sensor = Sensor()
    first = sensor.sample()
    assert first.cpu_busy == 0.0
    # Spin until a jiffy boundary shows up as busy time (deadline, not sleep).
    deadline = time.monotonic() + REAL_LOAD_DEADLINE_SECONDS
    reading = sensor.sample()
    while reading.cpu_busy == 0.0 and time.monotonic() < deadline:
        reading = sensor.sample()
    assert reading.cpu_busy > 0.0
    assert reading.cpu_busy <= reading.online_cpus + 1e-9
    assert len(reading.per_cpu_busy) == reading.online_cpus >= 1
    assert all(0.0 <= busy <= 1.0 for busy in reading.per_cpu_busy)
    assert reading.at > first.at
    assert reading.run_queue >= 1
    assert 0 < reading.memory_available <= reading.memory_total
    assert 0 <= reading.swap_free <= reading.swap_total
    assert reading.swap_in_per_s >= 0.0
    assert reading.swap_out_per_s >= 0.0
    assert reading.psi_available == HAVE_REAL_PSI
    for percent in (reading.cpu_some, reading.memory_some, reading.memory_full):
        assert 0.0 <= percent <= 100.0
    assert 0.0 <= reading.io_some <= 100.0
    assert 0.0 <= reading.io_full <= 100.0
    assert reading.cpu_some_total_us >= first.cpu_some_total_us  # cumulative


# --- PressureWatch -------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def has_cap_sys_resource() -> bool:
    for line in (REAL_PROC / "self" / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE_BIT & 1)
    return False


@pytest.fixture
def real_watch() -> Iterator[PressureWatch]:
    watch = PressureWatch()
    yield watch
    watch.close()


@pytest.mark.skipif(not HAVE_REAL_PSI, reason="this kernel has no /proc/pressure")
async def test_real_watch_arms_or_falls_back(real_watch: PressureWatch) -> None:
    fired = await real_watch.wait(0.2)
    assert isinstance(fired, bool)
    if real_watch.available:
        # The 1 s default needs CAP_SYS_RESOURCE; without it the 2 s retry is armed.
        expected = "some 150000 1000000" if has_cap_sys_resource() else "some 300000 2000000"
        assert real_watch.trigger == expected
    else:
        assert fired is False


@pytest.mark.skipif(not HAVE_REAL_PSI, reason="this kernel has no /proc/pressure")
async def test_real_watch_wakes_on_cpu_contention() -> None:
    # Three spinners pinned to one CPU keep tasks waiting for it: cpu "some"
    # stall. Proves the POLLPRI -> epoll -> add_reader path end to end.
    watch = PressureWatch(resources=("cpu",), stall_us=10_000, window_us=2_000_000)
    if not watch.available:
        pytest.skip("PSI triggers refused here; fallback covered elsewhere")
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(3)]
    try:
        deadline = time.monotonic() + REAL_LOAD_DEADLINE_SECONDS
        fired = False
        while not fired and (left := deadline - time.monotonic()) > 0:
            fired = await watch.wait(left)
        assert fired
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        watch.close()


@pytest.mark.skipif(not HAVE_REAL_PSI, reason="this kernel has no /proc/pressure")
async def test_real_watch_close_ends_a_wait() -> None:
    # A stall of the whole window never fires on an idle memory subsystem; a
    # 2 s window is accepted with or without CAP_SYS_RESOURCE.
    watch = PressureWatch(resources=("memory",), stall_us=2_000_000, window_us=2_000_000)
    if not watch.available:
        pytest.skip("PSI triggers refused here; fallback covered elsewhere")
    waiting = asyncio.create_task(watch.wait(REAL_LOAD_DEADLINE_SECONDS))
    await asyncio.sleep(0)  # the task runs up to its first suspension: reader added
    with pytest.raises(RuntimeError, match="already in progress"):
        await watch.wait(0.1)
    watch.close()
    assert await waiting is False
    assert not watch.available
    watch.close()  # idempotent


async def test_watch_without_psi_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    before = open_fds()
    watch = PressureWatch(make_procfs(tmp_path, pressure=None))
    assert not watch.available
    assert await watch.wait(0.01) is False
    assert await watch.wait(0.0) is False
    watch.close()
    watch.close()
    assert open_fds() == before
    records = warnings_from_sensing(caplog)
    assert len(records) == 1
    assert "ENOENT" in records[0].getMessage()


async def test_watch_on_plain_files_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regular files accept the trigger write but cannot be polled: epoll says EPERM.
    caplog.set_level(logging.WARNING, logger=LOGGER)
    before = open_fds()
    watch = PressureWatch(make_procfs(tmp_path, pressure=ALL_PSI))
    assert not watch.available
    assert open_fds() == before
    assert await watch.wait(0.01) is False
    # The trigger went out NUL-terminated, as psi_write() expects.
    assert (tmp_path / "pressure" / "memory").read_bytes().startswith(b"some 150000 1000000\0")
    assert "EPERM" in warnings_from_sensing(caplog)[0].getMessage()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"window_us": 400_000}, id="window-too-short"),
        pytest.param({"window_us": 10_000_001}, id="window-too-long"),
        pytest.param({"stall_us": 0}, id="zero-stall"),
        pytest.param({"stall_us": 1_000_001}, id="stall-beyond-window"),
        pytest.param({"kind": "half"}, id="bad-kind"),
        pytest.param({"resources": ("disk",)}, id="bad-resource"),
        pytest.param({"resources": ()}, id="no-resources"),
    ],
)
def test_watch_rejects_bad_settings(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PressureWatch(tmp_path, **kwargs)  # type: ignore[arg-type]
