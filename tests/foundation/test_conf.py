"""Configuration: precedence, aliases, file syntax and every validation error."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from derecho_core import Conf, ConfigError
from derecho_core.conf import KEYS, parse_command_line, parse_config_text

EMPTY_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    # No stray derecho.cfg from the developer's directory, no env vars from the shell.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DERECHO_CONF_FILE", raising=False)
    monkeypatch.delenv("DERECHO_NODE_CONF_FILE", raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults


def test_every_key_has_a_typed_default():
    conf = Conf.load(environ=EMPTY_ENV)
    for key in KEYS:
        if key.default is None:
            continue
        assert conf.get(key.name) == key.default
        assert conf.source(key.name) == "default"
    assert conf.get("DERECHO/contact_port") == 23580
    assert conf.get("DERECHO/restart_leaders") == ["127.0.0.1"]
    assert conf.get("DERECHO/disable_partitioning_safety") is False
    assert conf.get("PERS/storage") == "file"
    assert conf.get("LAYOUT/allocator") == "default"
    assert conf.get("SUBGROUP/DEFAULT/rdmc_send_algorithm") == "binomial_send"


def test_conf_objects_are_independent():
    a = Conf.load(overrides={"DERECHO/local_id": 1}, environ=EMPTY_ENV)
    b = a.with_overrides({"DERECHO/local_id": 2})
    assert (a.get("DERECHO/local_id"), b.get("DERECHO/local_id")) == (1, 2)


# ----------------------------------------------------------------------------- precedence


def test_precedence_default_group_node_cli_override(tmp_path):
    group = write(tmp_path / "g.cfg", "[DERECHO]\nlocal_id = 1\ngms_port = 1001\nsst_port = 2001\nrdmc_port = 3001\n"
                                      "external_port = 4001\n")
    node = write(tmp_path / "n.cfg", "[DERECHO]\ngms_port = 1002\nsst_port = 2002\nrdmc_port = 3002\n")
    conf = Conf.load(group, node, argv=["--DERECHO/sst_port=2003", "--DERECHO/rdmc_port", "3003"],
                     overrides={"DERECHO/rdmc_port": 3004}, environ=EMPTY_ENV)
    assert conf.get("DERECHO/state_transfer_port") == 28366 and conf.source("DERECHO/state_transfer_port") == "default"
    assert conf.get("DERECHO/external_port") == 4001 and conf.source("DERECHO/external_port") == f"{group}:6"
    assert conf.get("DERECHO/gms_port") == 1002 and conf.source("DERECHO/gms_port") == f"{node}:2"
    assert conf.get("DERECHO/sst_port") == 2003 and conf.source("DERECHO/sst_port") == "command line"
    assert conf.get("DERECHO/rdmc_port") == 3004 and conf.source("DERECHO/rdmc_port") == "override"


def test_files_from_environment(tmp_path):
    group = write(tmp_path / "env-group.cfg", "[DERECHO]\nlocal_id = 7\n")
    node = write(tmp_path / "env-node.cfg", "[DERECHO]\nlocal_ip = 10.0.0.7\n")
    conf = Conf.load(environ={"DERECHO_CONF_FILE": str(group), "DERECHO_NODE_CONF_FILE": str(node)})
    assert conf.get("DERECHO/local_id") == 7
    assert conf.get("DERECHO/local_ip") == "10.0.0.7"
    assert conf.files == [group, node]


def test_explicit_file_beats_environment(tmp_path):
    env_file = write(tmp_path / "env.cfg", "[DERECHO]\nlocal_id = 7\n")
    explicit = write(tmp_path / "explicit.cfg", "[DERECHO]\nlocal_id = 8\n")
    conf = Conf.load(explicit, environ={"DERECHO_CONF_FILE": str(env_file)})
    assert conf.get("DERECHO/local_id") == 8


def test_default_file_names_in_current_directory(tmp_path):
    write(tmp_path / "derecho.cfg", "[DERECHO]\nlocal_id = 4\nheartbeat_ms = 50\n")
    write(tmp_path / "derecho_node.cfg", "[DERECHO]\nlocal_id = 5\n")
    conf = Conf.load(environ=EMPTY_ENV)
    assert conf.get("DERECHO/local_id") == 5
    assert conf.get("DERECHO/heartbeat_ms") == 50
    assert conf.source("DERECHO/local_id") == "derecho_node.cfg:2"


def test_environment_naming_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\$DERECHO_CONF_FILE names .*nope.cfg"):
        Conf.load(environ={"DERECHO_CONF_FILE": str(tmp_path / "nope.cfg")})


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Conf.load(tmp_path / "missing.cfg", environ=EMPTY_ENV)


# ----------------------------------------------------------------------------- command line


def test_parse_args_splits_at_double_dash():
    conf, app = Conf.parse_args(["--DERECHO/local_id=3", "--PERS/reset", "true", "--", "a", "--verbose", "b"],
                                environ=EMPTY_ENV)
    assert conf.get("DERECHO/local_id") == 3
    assert conf.get("PERS/reset") is True
    assert app == ["a", "--verbose", "b"]


def test_application_arguments_start_after_the_last_double_dash():
    conf, app = Conf.parse_args(["--DERECHO/local_id=3", "--", "--", "x"], environ=EMPTY_ENV)
    assert conf.get("DERECHO/local_id") == 3
    assert app == ["x"]


def test_parse_args_without_double_dash_keeps_other_arguments():
    conf, app = Conf.parse_args(["100", "--DERECHO/local_id=2", "x"], environ=EMPTY_ENV)
    assert conf.get("DERECHO/local_id") == 2
    assert app == ["100", "x"]


def test_command_line_option_without_value():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_command_line(["--DERECHO/local_id"])


def test_stray_argument_before_double_dash():
    with pytest.raises(ConfigError, match="application arguments go after '--'"):
        Conf.parse_args(["oops", "--", "a"], environ=EMPTY_ENV)


def test_profile_keys_on_command_line():
    conf, _ = Conf.parse_args(["--SUBGROUP/DEFAULT/window_size=5", "--SUBGROUP/large/block_size=1024"],
                              environ=EMPTY_ENV)
    assert conf.get("SUBGROUP/DEFAULT/window_size") == 5
    assert conf.get("SUBGROUP/LARGE/block_size") == 1024
    assert conf.get("SUBGROUP/LARGE/window_size") == 5  # inherited from DEFAULT


# ----------------------------------------------------------------------------- file syntax


def test_sections_profiles_comments_and_multiline_values(tmp_path):
    layout = '[{"layout": [{"min_nodes_by_shard": ["2"], "max_nodes_by_shard": ["3"],\n' \
             '   "delivery_modes_by_shard": ["Ordered"], "profiles_by_shard": ["DEFAULT"]}]}]'
    cfg = write(tmp_path / "d.cfg", f"""# a comment
[DERECHO]
local_id = 2   # trailing comment
restart_leaders = 10.0.0.1, 10.0.0.2,10.0.0.3
restart_leader_ports = 23580,23581, 23582

[SUBGROUP/VCS]
window_size = 50
num_shards = 2
min_nodes = 2
max_nodes = 3

[LAYOUT]
json_layout = '{layout}'

[MYAPP]
greeting = hello # world
""")
    conf = Conf.load(cfg, environ=EMPTY_ENV)
    assert conf.get("DERECHO/local_id") == 2
    # three entries split correctly (Derecho's split_string gets this wrong)
    assert conf.get("DERECHO/restart_leaders") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert conf.get("DERECHO/restart_leader_ports") == [23580, 23581, 23582]
    assert conf.get("SUBGROUP/VCS/window_size") == 50
    assert conf.get("SUBGROUP/vcs/num_shards") == 2
    assert conf.profile("VCS")["max_nodes"] == 3
    assert conf.profiles() == ["DEFAULT", "VCS"]
    assert json.loads(conf.json_layout())[0]["layout"][0]["max_nodes_by_shard"] == ["3"]
    assert conf.get("MYAPP/greeting") == "hello"


def test_unset_optional_profile_key():
    conf = Conf.load(environ=EMPTY_ENV)
    assert conf.get("SUBGROUP/DEFAULT/num_shards", None) is None
    with pytest.raises(ConfigError, match="not set"):
        conf.get("SUBGROUP/DEFAULT/num_shards")


def test_unclosed_quote_names_file_and_line(tmp_path):
    cfg = write(tmp_path / "q.cfg", "[LAYOUT]\njson_layout = '[1,\n2\n")
    with pytest.raises(ConfigError, match=r"q.cfg:2: LAYOUT/json_layout: .*never closed"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_garbage_line(tmp_path):
    cfg = write(tmp_path / "g.cfg", "[DERECHO]\nthis is not a setting\n")
    with pytest.raises(ConfigError, match=r"g.cfg:2: cannot parse"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_key_before_section(tmp_path):
    cfg = write(tmp_path / "k.cfg", "local_id = 1\n")
    with pytest.raises(ConfigError, match=r"k.cfg:1: .*before any \[SECTION\]"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_parse_config_text_records_lines():
    settings = parse_config_text("[PERS]\n\n  reset = true\n", "x.cfg")
    assert [(s.key, s.raw, s.source) for s in settings] == [("PERS/reset", "true", "x.cfg:3")]


# ----------------------------------------------------------------------------- aliases


def test_guide_aliases(tmp_path):
    cfg = write(tmp_path / "a.cfg", "[DERECHO]\nleader_ip = 192.0.2.1\nleader_gms_port = 24000\n")
    conf = Conf.load(cfg, environ=EMPTY_ENV)
    assert conf.get("DERECHO/contact_ip") == "192.0.2.1"
    assert conf.get("DERECHO/contact_port") == 24000
    assert conf.get("DERECHO/leader_ip") == "192.0.2.1"  # readable under the old name too
    assert conf.alias_used("DERECHO/contact_ip") == "DERECHO/leader_ip"


def test_timeout_ms_is_accepted_with_a_warning(tmp_path, caplog):
    cfg = write(tmp_path / "t.cfg", "[DERECHO]\ntimeout_ms = 900\n")
    with caplog.at_level(logging.WARNING, logger="derecho.conf"):
        conf = Conf.load(cfg, environ=EMPTY_ENV)
    assert conf.get("DERECHO/suspicion_timeout_ms") == 900
    assert any("timeout_ms is deprecated" in r.message and "suspicion_timeout_ms" in r.message
               for r in caplog.records)


def test_json_layout_path_alias_resolves_relative_to_config(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    write(sub / "layout.json", '[{"layout": []}]')
    cfg = write(sub / "d.cfg", "[LAYOUT]\njson_layout_path = layout.json\n")
    conf = Conf.load(cfg, environ=EMPTY_ENV)
    assert conf.json_layout_path() == sub.resolve() / "layout.json"
    assert conf.json_layout() == '[{"layout": []}]'


# ----------------------------------------------------------------------------- validation

BAD_VALUES = [
    ("DERECHO", "local_id = three", "expected an integer"),
    ("DERECHO", "gms_port = 0", "port must be in 1..65535"),
    ("DERECHO", "contact_port = 70000", "port must be in 1..65535"),
    ("DERECHO", "restart_leader_ports = 23580,99999", "port must be in 1..65535"),
    ("DERECHO", "max_p2p_reply_payload_size = 64", "at least 128"),
    ("SUBGROUP/DEFAULT", "max_reply_payload_size = 100", "at least 128"),
    ("SUBGROUP/DEFAULT", "window_size = 0", "at least 1"),
    ("SUBGROUP/DEFAULT", "block_size = 0", "at least 1"),
    ("SUBGROUP/LARGE", "rdmc_send_algorithm = binomial", "expected one of binomial_send"),
    ("PERS", "reset = maybe", "expected true/false"),
    ("LOGGER", "default_log_level = loud", "expected one of trace"),
    ("DERECHO", "restart_leaders = a,,b", "empty entry"),
    ("LAYOUT", "json_layout = [1, 2", "not valid JSON"),
    ("DERECHO", "serializer = yaml", "expected one of msgpack, pickle"),
]


@pytest.mark.parametrize("section,line,message", BAD_VALUES)
def test_bad_value_names_file_line_and_key(tmp_path, section, line, message):
    cfg = write(tmp_path / "bad.cfg", f"# header\n[{section}]\n{line}\n")
    key = f"{section}/{line.split('=')[0].strip()}"
    with pytest.raises(ConfigError) as info:
        Conf.load(cfg, environ=EMPTY_ENV)
    text = str(info.value)
    assert f"bad.cfg:3: {key}: " in text
    assert message in text
    assert info.value.key == key


def test_bad_value_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: DERECHO/gms_port: port must be"):
        Conf.parse_args(["--DERECHO/gms_port=-1"], environ=EMPTY_ENV)


def test_bad_override():
    with pytest.raises(ConfigError, match=r"override: SUBGROUP/DEFAULT/window_size: must be at least 1"):
        Conf.load(overrides={"SUBGROUP/DEFAULT/window_size": 0}, environ=EMPTY_ENV)


def test_local_id_must_be_below_max_node_id(tmp_path):
    cfg = write(tmp_path / "n.cfg", "[DERECHO]\nmax_node_id = 10\nlocal_id = 10\n")
    with pytest.raises(ConfigError, match=r"n.cfg:3: DERECHO/local_id: local_id \(10\) must be less than "
                                          r"max_node_id \(10\)"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_json_layout_and_file_are_exclusive(tmp_path):
    write(tmp_path / "l.json", "[]")
    cfg = write(tmp_path / "x.cfg", "[LAYOUT]\njson_layout = []\njson_layout_file = l.json\n")
    with pytest.raises(ConfigError, match=r"x.cfg:3: LAYOUT/json_layout_file: json_layout \(.*x.cfg:2\) and "
                                          r"json_layout_file .* are exclusive"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_json_layout_file_must_exist_and_parse(tmp_path):
    cfg = write(tmp_path / "x.cfg", "[LAYOUT]\njson_layout_file = missing.json\n")
    with pytest.raises(ConfigError, match=r"x.cfg:2: LAYOUT/json_layout_file: cannot read layout file"):
        Conf.load(cfg, environ=EMPTY_ENV)
    write(tmp_path / "broken.json", "[{")
    cfg = write(tmp_path / "y.cfg", "[LAYOUT]\njson_layout_file = broken.json\n")
    with pytest.raises(ConfigError, match=r"y.cfg:2: .* is not valid JSON"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_restart_leader_lists_must_match(tmp_path):
    cfg = write(tmp_path / "r.cfg", "[DERECHO]\nrestart_leaders = a,b,c\nrestart_leader_ports = 1,2\n")
    with pytest.raises(ConfigError, match=r"r.cfg:2: .*3 entries .* has 2"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_unknown_key_did_you_mean(tmp_path):
    cfg = write(tmp_path / "u.cfg", "[DERECHO]\n\nheartbeat_msec = 5\n")
    with pytest.raises(ConfigError, match=r"u.cfg:3: DERECHO/heartbeat_msec: unknown key 'heartbeat_msec' in "
                                          r"\[DERECHO\]; did you mean 'heartbeat_ms'\?"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_unknown_profile_key_did_you_mean(tmp_path):
    cfg = write(tmp_path / "u.cfg", "[SUBGROUP/SMALL]\nwindow = 5\n")
    with pytest.raises(ConfigError, match=r"did you mean 'window_size'"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_misspelled_section(tmp_path):
    cfg = write(tmp_path / "s.cfg", "[DERECO]\nlocal_id = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[DERECO\]; did you mean \[DERECHO\]"):
        Conf.load(cfg, environ=EMPTY_ENV)


def test_get_unknown_key():
    conf = Conf.load(environ=EMPTY_ENV)
    with pytest.raises(ConfigError, match="did you mean 'local_id'"):
        conf.get("DERECHO/local_idd")


# ----------------------------------------------------------------------------- derecho config


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "derecho_core", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_derecho_config_shows_command_line_value(tmp_path):
    out = run_cli("config", "--DERECHO/local_id=3", "--", "a", "b", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("local_id") and "= 3" in line and "# command line" in line for line in lines)
    assert "application arguments: a b" in out.stdout


def test_derecho_config_json_with_files(tmp_path):
    write(tmp_path / "derecho.cfg", "[RDMA]\nprovider = tcp\n")
    out = run_cli("config", "--json", "--PERS/reset=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["values"]["RDMA/provider"] == {"value": "tcp", "source": "derecho.cfg:2"}
    assert data["values"]["PERS/reset"] == {"value": True, "source": "command line"}
    assert data["values"]["DERECHO/gms_port"]["source"] == "default"


def test_derecho_config_reports_errors(tmp_path):
    write(tmp_path / "derecho.cfg", "[DERECHO]\nlocal_id = x\n")
    out = run_cli("config", cwd=tmp_path)
    assert out.returncode == 1
    assert "derecho.cfg:2: DERECHO/local_id: expected an integer" in out.stderr
