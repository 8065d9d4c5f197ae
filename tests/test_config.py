"""Config files: defaults, sizes with units, and errors that name file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent import config as agent_config
from agent.kernel import OnlineType
from broker import cli as broker_cli
from broker import config as broker_config
from vmtide.config import ConfigError, parse_size

GiB = 1 << 30


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("512MiB", 512 << 20),
        ("4G", 4 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("128 MB", 128 << 20),
        ("2048", 2048),
        ("1TiB", 1 << 40),
    ],
)
def test_sizes(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", ["", "lots", "-1", -5, True, 1.5, "12XB"])
def test_bad_sizes(raw: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(raw)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_agent_defaults_without_a_file() -> None:
    config = agent_config.AgentConfig()
    assert config.limits.cpus.minimum == 1
    assert config.memory.online_type is OnlineType.MOVABLE
    assert config.metrics.address == "127.0.0.1"


def test_agent_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[agent]
guest_id = "web-1"
sensing_interval_seconds = 0.5
[broker]
target = "unix:/run/vmtide.sock"
[limits.cpus]
minimum = 2
maximum = 8
burst = 12
[limits.memory]
minimum_bytes = "2GiB"
maximum_bytes = "16GiB"
[memory]
online_type = "online_kernel"
[metrics]
enabled = false
""",
    )
    config = agent_config.load(path)
    assert config.agent.guest_id == "web-1"
    assert config.agent.sensing_interval_seconds == 0.5
    assert config.broker.target == "unix:/run/vmtide.sock"
    assert (config.limits.cpus.minimum, config.limits.cpus.maximum, config.limits.cpus.burst) == (
        2,
        8,
        12,
    )
    assert config.limits.memory.minimum_bytes == 2 * GiB
    assert config.limits.memory.maximum_bytes == 16 * GiB
    assert config.memory.online_type is OnlineType.KERNEL
    assert not config.metrics.enabled


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[agent]\nguest = 1\n", "agent.guest", "unknown key"),
        ("[limits.cpus]\nminimum = 0\n", "limits.cpus.minimum", "at least 1 CPU"),
        ("[limits.cpus]\nminimum = 4\nmaximum = 2\n", "limits.cpus.maximum", "below minimum"),
        (
            '[limits.memory]\nminimum_bytes = "lots"\n',
            "limits.memory.minimum_bytes",
            "expected a size",
        ),
        (
            '[agent]\nsensing_interval_seconds = "fast"\n',
            "agent.sensing_interval_seconds",
            "expected a number",
        ),
        ("[metrics]\nenabled = 1\n", "metrics.enabled", "expected true or false"),
        ("[metrics]\nport = 70000\n", "metrics.port", "not a TCP port"),
        ('[memory]\nonline_type = "sideways"\n', "memory.online_type", "not a valid"),
        ('[broker]\ntarget = ""\n', "broker.target", "must not be empty"),
        ("agent = 3\n", "agent", "expected a table"),
        ("[policy]\nfoo = 1\n", "policy.foo", "unknown key"),
    ],
)
def test_agent_errors_name_file_key_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        agent_config.load(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("agent", "where"),
    [
        ("", "/run/vmtide-agent/state.json"),
        ('state_file = "/var/tmp/vmtide.json"', "/var/tmp/vmtide.json"),
        ("publish_state = false", None),
        # A fake tree never writes the real /run: its state goes next to the tree.
        ('sysfs_root = "/tmp/g/sys"', "/tmp/g/agent.json"),
        ('sysfs_root = "/tmp/g/sys"\nstate_file = "/tmp/s.json"', "/tmp/s.json"),
        ('sysfs_root = "/tmp/g/sys"\npublish_state = false', None),
    ],
)
def test_where_the_live_state_goes(tmp_path: Path, agent: str, where: str | None) -> None:
    config = agent_config.load(write(tmp_path, f"[agent]\n{agent}\n"))
    assert config.agent.live_state_file == (Path(where) if where else None)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent\nguest_id = 'x'\n")
    with pytest.raises(ConfigError, match=r"agent.toml: not valid TOML"):
        agent_config.load(path)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        agent_config.load_or_default(tmp_path / "nope.toml")


def test_check_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "[limits.cpus]\nminimum = 1\n")
    assert agent_cli.main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits.cpus]\nminimum = -1\n")
    assert agent_cli.main(["check-config", str(bad)]) == 1
    assert f"{bad}: limits.cpus.minimum:" in capsys.readouterr().err


def test_broker_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        """
[pool]
cpus = 8
memory_bytes = "16GiB"
[[guests]]
id = "a"
listen = "127.0.0.1:7471"
priority = 10
backend = "simulated"
simulated_root = "/tmp/a"
[guests.cpus]
minimum = 1
maximum = 4
[[guests]]
id = "b"
listen = "unix:/run/b.sock"
qmp_socket = "/run/b.qmp"
"""
    )
    config = broker_config.load(path)
    assert [g.id for g in config.guests] == ["a", "b"]
    assert config.guests[0].cpus.maximum == 4
    assert config.pool.memory_bytes == 16 * GiB
    assert broker_cli.main(["check-config", str(path)]) == 0
    path.write_text(path.read_text().replace('id = "b"', 'id = "a"'))
    assert broker_cli.main(["check-config", str(path)]) == 1
    assert "guests: duplicate guest id 'a'" in capsys.readouterr().err


def test_broker_guest_errors(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[[guests]]\nid = "a"\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"guests\[0\]\.qmp_socket: required"):
        broker_config.load(path)


def test_example_configs_load() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs"
    example = agent_config.load(docs / "agent.example.toml")
    assert example.agent.guest_id == "web-1"
    broker = broker_config.load(docs / "broker.example.toml")
    assert [g.id for g in broker.guests] == ["web-1", "batch-1"]
