"""``load_config``: defaults, a TOML file, ``FAIRGATE_<SECTION>_<FIELD>`` variables and overrides,
in that order of precedence, and errors that name the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import policy_from_config
from gateway.config import ConfigError, SloClass, load_config

CONFIG_TOML = """
[gateway]
host = "0.0.0.0"
port = 9000
admin_token = "from-the-file-0123456789"
prefill_workers = ["http://p0:8001", "http://p1:8001"]
decode_workers = ["http://d0:8002"]

[store]
path = "/var/lib/fairgate/state.db"

[scheduler]
policy = "fcfs"
queue_timeout_s = 30.5
max_prefill_inflight_tokens = 4096

[[slo_classes]]
name = "gold"
rank = 10
ttft_target_s = 0.5
tpot_target_s = 0.05

[[slo_classes]]
name = "bulk"
rank = 1
ttft_target_s = 600.0
sheddable = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fairgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file_or_variables() -> None:
    config = load_config(environ={})
    assert (config.gateway.host, config.gateway.port, config.gateway.admin_token) == (
        "127.0.0.1",
        8000,
        "",
    )
    assert config.gateway.prefill_workers == config.gateway.decode_workers == []
    assert config.store.path == "fairgate.db"
    assert config.model.name == "default"
    assert (config.scheduler.policy, config.scheduler.queue_timeout_s) == ("auto", 120.0)
    assert config.scheduler.max_prefill_inflight_tokens == 8192
    assert [c.name for c in config.slo_classes] == ["interactive", "standard", "batch"]


def test_the_process_environment_is_read_unless_another_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAIRGATE_GATEWAY_PORT", "1234")
    assert load_config().gateway.port == 1234  # os.environ is the default
    assert load_config(environ={}).gateway.port == 8000


def test_a_file_sets_every_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONFIG_TOML), environ={})
    assert config.gateway.host == "0.0.0.0"
    assert config.gateway.port == 9000
    assert config.gateway.admin_token == "from-the-file-0123456789"
    assert config.gateway.prefill_workers == ["http://p0:8001", "http://p1:8001"]
    assert config.gateway.decode_workers == ["http://d0:8002"]
    assert config.gateway.poll_interval_s == 0.5  # not in the file: the default
    assert config.store.path == "/var/lib/fairgate/state.db"
    assert config.scheduler.queue_timeout_s == 30.5
    assert config.scheduler.max_prefill_inflight_tokens == 4096
    assert config.slo_classes == [
        SloClass("gold", rank=10, ttft_target_s=0.5, tpot_target_s=0.05),
        SloClass("bulk", rank=1, ttft_target_s=600.0, sheddable=True),
    ]


def test_environment_variables_set_fields_lists_and_numbers() -> None:
    config = load_config(
        environ={
            "FAIRGATE_GATEWAY_DECODE_WORKERS": "http://d0:8002, http://d1:8002,,",
            "FAIRGATE_GATEWAY_PORT": "8123",
            "FAIRGATE_SCHEDULER_QUEUE_TIMEOUT_S": "2.5",
            "FAIRGATE_STORE_PATH": "/tmp/x.db",
            "FAIRGATE_MODEL_NAME": "tiny",
            "UNRELATED": "ignored",
        }
    )
    assert config.gateway.decode_workers == ["http://d0:8002", "http://d1:8002"]
    assert config.gateway.port == 8123 and isinstance(config.gateway.port, int)
    assert config.scheduler.queue_timeout_s == 2.5
    assert config.store.path == "/tmp/x.db"
    assert config.model.name == "tiny"


def test_overrides_beat_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG_TOML)
    environ = {"FAIRGATE_GATEWAY_PORT": "9100", "FAIRGATE_GATEWAY_HOST": "10.0.0.1"}
    config = load_config(path, environ=environ)
    assert (config.gateway.port, config.gateway.host) == (9100, "10.0.0.1")
    assert config.gateway.decode_workers == ["http://d0:8002"]  # the file's, not overridden

    config = load_config(
        path,
        environ=environ,
        overrides={"gateway": {"port": 9200, "host": None}, "scheduler": {"policy": "wfq"}},
    )
    assert config.gateway.port == 9200
    assert config.gateway.host == "10.0.0.1"  # a None override (a flag not given) is no override
    assert config.scheduler.policy == "wfq"
    assert config.scheduler.queue_timeout_s == 30.5  # the file's


def test_an_unknown_field_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nprot = 8000\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="colour"):
        load_config(environ={}, overrides={"store": {"colour": "blue"}})


def test_a_bad_type_is_an_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load_config(environ={"FAIRGATE_GATEWAY_PORT": "eighty"})
    path = write(tmp_path, '[scheduler]\nmax_prefill_inflight_tokens = "lots"\n')
    with pytest.raises(ConfigError, match=r"scheduler\.max_prefill_inflight_tokens"):
        load_config(path, environ={})
    path = write(tmp_path, '[[slo_classes]]\nname = "gold"\nttft_target_s = 1.0\n')
    with pytest.raises(ConfigError, match="rank"):
        load_config(path, environ={})


def test_a_file_that_is_missing_or_not_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match=r"fairgate\.toml"):
        load_config(write(tmp_path, "[gateway\nport = 1\n"), environ={})


def test_an_empty_list_of_slo_classes_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SLO class"):
        load_config(write(tmp_path, "slo_classes = []\n"), environ={})


def test_slo_class_lookup_and_the_lowest_class(tmp_path: Path) -> None:
    defaults = load_config(environ={})
    interactive = defaults.slo_class("interactive")
    assert interactive is not None and interactive.ttft_target_s == 2.0
    assert defaults.slo_class("platinum") is None
    assert defaults.lowest_class.name == "batch"

    config = load_config(write(tmp_path, CONFIG_TOML), environ={})
    assert config.slo_class("interactive") is None  # the file's classes replace the defaults
    gold = config.slo_class("gold")
    assert gold is not None and gold.rank == 10
    assert config.lowest_class.name == "bulk"


def test_the_unstreamed_flush_interval_is_bounded() -> None:
    assert load_config(environ={}).gateway.unstreamed_flush_s == 0.05
    config = load_config(environ={"FAIRGATE_GATEWAY_UNSTREAMED_FLUSH_S": "0"})
    assert config.gateway.unstreamed_flush_s == 0.0
    with pytest.raises(ConfigError, match="unstreamed_flush_s"):
        load_config(environ={"FAIRGATE_GATEWAY_UNSTREAMED_FLUSH_S": "2"})


def test_the_policy_is_built_from_the_scheduler_section() -> None:
    one = load_config(environ={"FAIRGATE_GATEWAY_PREFILL_WORKERS": "http://p0:1"})
    assert policy_from_config(one).name == "dlpm"
    two = load_config(environ={"FAIRGATE_GATEWAY_PREFILL_WORKERS": "http://p0:1,http://p1:1"})
    assert policy_from_config(two).name == "d2lpm"
    for name in ("fcfs", "vtc", "dlpm", "d2lpm", "rr_lpm"):
        config = load_config(environ={"FAIRGATE_SCHEDULER_POLICY": name})
        assert policy_from_config(config).name == name
    with pytest.raises(ValueError, match="unknown scheduling policy 'wfq'"):
        policy_from_config(load_config(environ={"FAIRGATE_SCHEDULER_POLICY": "wfq"}))
    with pytest.raises(ConfigError, match="quantum_tokens"):
        load_config(environ={"FAIRGATE_SCHEDULER_QUANTUM_TOKENS": "0"})
