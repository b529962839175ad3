"""Configuration: Derecho's files, sections and keys, typed and validated.

Where values come from, lowest precedence first:

1. the typed defaults of :data:`KEYS`;
2. the group file: ``config_file`` argument, else ``$DERECHO_CONF_FILE``, else
   ``derecho.cfg`` in the current directory if it is a regular file;
3. the node file: ``node_config_file``, else ``$DERECHO_NODE_CONF_FILE``, else
   ``derecho_node.cfg`` in the current directory;
4. the command line (``--SECTION/key=value`` or ``--SECTION/key value``);
5. ``overrides`` given in code (``{"DERECHO/local_id": 3}``).

A :class:`Conf` is an ordinary object passed explicitly; there is no global
singleton, so several nodes can live in one process.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .errors import ConfigError

log = logging.getLogger("derecho.conf")

CONF_FILE_ENV = "DERECHO_CONF_FILE"
NODE_CONF_FILE_ENV = "DERECHO_NODE_CONF_FILE"
DEFAULT_CONF_FILE = "derecho.cfg"
DEFAULT_NODE_CONF_FILE = "derecho_node.cfg"

RDMC_SEND_ALGORITHMS = ("binomial_send", "chain_send", "sequential_send", "tree_send")
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
SERIALIZERS = ("msgpack", "pickle")
MIN_REPLY_SIZE = 128  # Derecho's DERECHO_MIN_RPC_RESPONSE_SIZE

# ----------------------------------------------------------------------------- value types


def _parse_str(raw: str) -> str:
    return raw


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected true/false (or yes/no, 1/0), got {raw!r}")


def _split_list(raw: str) -> list[str]:
    # Derecho's split_string mis-splits lists of 3 or more (spec §1.6); this one does not.
    items = [item.strip() for item in raw.split(",")]
    if items == [""]:
        return []
    if any(item == "" for item in items):
        raise ValueError(f"empty entry in comma list {raw!r}")
    return items


def _parse_port(raw: str) -> int:
    port = _parse_int(raw)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    return port


def _parse_port_list(raw: str) -> list[int]:
    return [_parse_port(p) for p in _split_list(raw)]


def _parse_json(raw: str) -> Any:
    if raw.strip() == "":
        return ""
    try:
        json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. a number of 4300+ digits
        raise ValueError(f"not valid JSON ({exc})") from None
    return raw


def _one_of(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip().lower()
        if v not in allowed:
            close = difflib.get_close_matches(v, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}{hint}")
        return v

    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        v = _parse_int(raw)
        if v < minimum:
            raise ValueError(f"must be at least {minimum}, got {v}")
        return v

    return parse


_parse_log_level_or_inherit = _one_of("", *LOG_LEVELS)


@dataclass(frozen=True)
class Key:
    """One configuration key: its typed default, parser and meaning."""

    name: str  # "SECTION/key"; for profiles "SUBGROUP/DEFAULT/key"
    default: Any
    parse: Callable[[str], Any]
    help: str
    type_name: str = "str"

    @property
    def section(self) -> str:
        return self.name.rsplit("/", 1)[0]

    @property
    def short(self) -> str:
        return self.name.rsplit("/", 1)[1]


def _k(name: str, default: Any, parse: Callable[[str], Any], type_name: str, help: str) -> Key:
    return Key(name, default, parse, help, type_name)


#: Every key of Derecho's §1.4 plus the few derecho-py adds, with typed defaults.
#: Profile keys are listed for ``SUBGROUP/DEFAULT``; other profiles take the same keys.
KEYS: tuple[Key, ...] = (
    # DERECHO
    _k("DERECHO/contact_ip", "127.0.0.1", _parse_str, "str",
       "IP of the node a starting process contacts to join; the node whose local_ip and gms_port "
       "equal contact_ip and contact_port starts a fresh group as its leader. Alias: leader_ip."),
    _k("DERECHO/contact_port", 23580, _parse_port, "port", "GMS port of the contact node. Alias: leader_gms_port."),
    _k("DERECHO/restart_leaders", ["127.0.0.1"], _split_list, "list[str]",
       "Comma list, in priority order, of the IPs of restart leaders for total restart."),
    _k("DERECHO/restart_leader_ports", [23580], _parse_port_list, "list[port]",
       "GMS ports of the restart leaders, in the same order as restart_leaders."),
    _k("DERECHO/local_id", 0, _at_least(0), "int", "This node's numeric id; must be < max_node_id."),
    _k("DERECHO/local_ip", "127.0.0.1", _parse_str, "str", "This node's IP, advertised to the others."),
    _k("DERECHO/gms_port", 23580, _parse_port, "port", "TCP port for join requests and external clients' requests."),
    _k("DERECHO/state_transfer_port", 28366, _parse_port, "port", "TCP port for shipping views and object state."),
    _k("DERECHO/sst_port", 37683, _parse_port, "port", "Port of the SST connections."),
    _k("DERECHO/rdmc_port", 31675, _parse_port, "port", "Port of the RDMC (large message) connections."),
    _k("DERECHO/external_port", 32645, _parse_port, "port", "Port for P2P connections with external clients."),
    _k("DERECHO/max_node_id", 1024, _at_least(1), "int", "Exclusive upper bound of node ids."),
    _k("DERECHO/p2p_loop_busy_wait_before_sleep_ms", 0, _at_least(0), "int",
       "How long a transport's poll keeps busy-polling after activity before it sleeps. C++ Derecho "
       "spins for 250 ms; derecho-py defaults to 0 (sleep at once): on a machine with few cores a "
       "spinning poller steals the CPU from the other processes and from this node's own threads."),
    _k("DERECHO/heartbeat_ms", 100, _at_least(1), "int",
       "Period of the failure detector's heartbeats. C++ Derecho's default is 1 ms of busy polling; "
       "derecho-py sleeps between heartbeats, so its default is 100 ms."),
    _k("DERECHO/suspicion_timeout_ms", 2000, _at_least(1), "int",
       "A member silent for this long is suspected of failure. Successor of the guide's timeout_ms."),
    _k("DERECHO/sst_poll_cq_timeout_ms", 2000, _at_least(1), "int",
       "How long a transport waits for a send to complete before it reports the peer failed."),
    _k("DERECHO/restart_timeout_ms", 2000, _at_least(1), "int",
       "Total restart: the length of the restart leader's accept window."),
    _k("DERECHO/enable_backup_restart_leaders", False, _parse_bool, "bool",
       "Restarting nodes fall back to the next restart leader when one fails."),
    _k("DERECHO/disable_partitioning_safety", False, _parse_bool, "bool",
       "If false (derecho-py's default; C++ defaults to true) a node that would lose the majority "
       "stops and says so; if true it only logs a warning."),
    _k("DERECHO/max_p2p_request_payload_size", 10240, _at_least(1), "int", "Largest serialized P2P request."),
    _k("DERECHO/max_p2p_reply_payload_size", 10240, _at_least(MIN_REPLY_SIZE), "int",
       f"Largest P2P reply; at least {MIN_REPLY_SIZE}."),
    _k("DERECHO/p2p_window_size", 16, _at_least(1), "int", "Outstanding P2P requests per peer."),
    _k("DERECHO/cluster_key_file", "", _parse_str, "path",
       "File holding a shared secret; when set, every connection proves knowledge of it (HMAC)."),
    _k("DERECHO/client_key_file", "", _parse_str, "path",
       "File holding the shared secret of external clients: when set, a member accepts on external_port "
       "only clients that prove this key (HMAC), and an external client proves it; a client holding only "
       "the cluster key is refused. Give clients this file, never cluster_key_file. Empty: external "
       "clients use cluster_key_file."),
    _k("DERECHO/serializer", "msgpack", _one_of(*SERIALIZERS), "str",
       "How RPC arguments, replies and object state are encoded: msgpack, or pickle for trusted clusters."),
    # SUBGROUP/DEFAULT (and every other profile)
    _k("SUBGROUP/DEFAULT/max_payload_size", 10240, _at_least(1), "int",
       "Largest user payload one multicast may carry (bytes, without the header)."),
    _k("SUBGROUP/DEFAULT/max_reply_payload_size", 10240, _at_least(MIN_REPLY_SIZE), "int",
       f"Largest reply to an ordered_send RPC; at least {MIN_REPLY_SIZE}."),
    _k("SUBGROUP/DEFAULT/max_smc_payload_size", 10240, _at_least(1), "int",
       "Payloads up to this size travel by SMC (batched small messages), larger ones by RDMC."),
    _k("SUBGROUP/DEFAULT/block_size", 1048576, _at_least(1), "int", "RDMC block size in bytes; > 0."),
    _k("SUBGROUP/DEFAULT/window_size", 16, _at_least(1), "int",
       "Per-sender pipeline depth: outstanding undelivered messages; >= 1."),
    _k("SUBGROUP/DEFAULT/rdmc_send_algorithm", "binomial_send", _one_of(*RDMC_SEND_ALGORITHMS), "str",
       "RDMC schedule: " + ", ".join(RDMC_SEND_ALGORITHMS) + "."),
    _k("SUBGROUP/DEFAULT/num_shards", None, _at_least(1), "int",
       "Read by flexible_even_shards(profile): number of shards."),
    _k("SUBGROUP/DEFAULT/min_nodes", None, _at_least(1), "int",
       "Read by flexible_even_shards(profile) and custom_shard_policy: minimum nodes per shard."),
    _k("SUBGROUP/DEFAULT/max_nodes", None, _at_least(1), "int",
       "Read by flexible_even_shards(profile) and custom_shard_policy: maximum nodes per shard."),
    # RDMA
    _k("RDMA/provider", "sockets", _parse_str, "str",
       "Transport provider: sockets (derecho-transport-sockets) or a libfabric provider such as tcp "
       "or verbs (derecho-transport-verbs)."),
    _k("RDMA/domain", "", _parse_str, "str",
       "Interface, address or libfabric domain to use (lo, eth0, mlx5_0); empty means the interface "
       "that carries local_ip. C++ Derecho defaults to eth0."),
    _k("RDMA/tx_depth", 256, _at_least(1), "int", "Send queue depth per peer; a full queue pushes back on the sender."),
    _k("RDMA/rx_depth", 256, _at_least(1), "int", "Receive queue depth."),
    # PERS
    _k("PERS/file_path", ".plog", _parse_str, "path",
       "Directory of the file logs and of the saved views and ragged trims (created mode 0700)."),
    _k("PERS/ramdisk_path", "/dev/shm/volatile_t", _parse_str, "path", "Base directory of Volatile logs."),
    _k("PERS/reset", False, _parse_bool, "bool", "If true every log and saved object is wiped when opened."),
    _k("PERS/max_log_entry", 1048576, _at_least(1), "int", "Capacity in entries of each log's index."),
    _k("PERS/max_data_size", 549755813888, _at_least(1), "int", "Capacity in bytes of each log's data."),
    _k("PERS/private_key_file", "private_key.pem", _parse_str, "path", "PEM private key for signed logs."),
    _k("PERS/storage", "file", _parse_str, "str",
       "Default log store of Persistent fields: file (derecho-storage-file) or mem (derecho-storage-mem)."),
    # LAYOUT
    _k("LAYOUT/json_layout", "", _parse_json, "json",
       "The subgroup layout as JSON text (usually a single-quoted multi-line value)."),
    _k("LAYOUT/json_layout_file", "", _parse_str, "path",
       "File holding the JSON layout; relative to the config file that names it. Exclusive with json_layout."),
    _k("LAYOUT/allocator", "default", _parse_str, "str", "Name of the allocator plugin that builds the layout."),
    # LOGGER
    _k("LOGGER/default_log_name", "derecho_debug", _parse_str, "str",
       "Base name of the log file (<name>.log), rotated at 1 MiB."),
    _k("LOGGER/default_log_level", "info", _one_of(*LOG_LEVELS), "level",
       "Level of every logger not given its own: " + "/".join(LOG_LEVELS) + "."),
    _k("LOGGER/sst_log_level", "", _parse_log_level_or_inherit, "level", "Level of derecho.sst (empty: default)."),
    _k("LOGGER/rpc_log_level", "", _parse_log_level_or_inherit, "level", "Level of derecho.rpc (empty: default)."),
    _k("LOGGER/viewmanager_log_level", "", _parse_log_level_or_inherit, "level",
       "Level of derecho.viewmanager (empty: default)."),
    _k("LOGGER/persistence_log_level", "", _parse_log_level_or_inherit, "level",
       "Level of derecho.persistence (empty: default)."),
    _k("LOGGER/log_to_terminal", True, _parse_bool, "bool", "Log to standard error."),
    _k("LOGGER/log_to_file", False, _parse_bool, "bool",
       "Also log to <default_log_name>.log (C++ Derecho always does; derecho-py asks)."),
    _k("LOGGER/log_file_depth", 3, _at_least(0), "int", "How many rotated log files to keep."),
)

KEY_TABLE: dict[str, Key] = {k.name: k for k in KEYS}
SECTIONS = ("DERECHO", "SUBGROUP", "RDMA", "PERS", "LAYOUT", "LOGGER")
PROFILE_KEYS: dict[str, Key] = {k.short: k for k in KEYS if k.name.startswith("SUBGROUP/DEFAULT/")}
#: keys whose absence in a profile other than DEFAULT falls back to DEFAULT's value
PROFILE_INHERITED = ("max_payload_size", "max_reply_payload_size", "max_smc_payload_size", "block_size",
                     "window_size", "rdmc_send_algorithm")

#: old name -> (new name, warn?) ; the guide's names are plain aliases, timeout_ms is deprecated
ALIASES: dict[str, tuple[str, bool]] = {
    "DERECHO/leader_ip": ("DERECHO/contact_ip", False),
    "DERECHO/leader_gms_port": ("DERECHO/contact_port", False),
    "DERECHO/timeout_ms": ("DERECHO/suspicion_timeout_ms", True),
    "LAYOUT/json_layout_path": ("LAYOUT/json_layout_file", False),
}


@dataclass
class _Value:
    value: Any
    source: str  # "default", "derecho.cfg:12", "command line", "override"
    raw: str | None = None
    given_as: str | None = None  # the alias the user wrote, if any
    base_dir: Path | None = None  # directory of the file that set it


# ----------------------------------------------------------------------------- file parsing

_SECTION_RE = re.compile(r"^\[\s*([A-Za-z0-9_./-]+)\s*\]\s*(?:#.*)?$")
_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$")


@dataclass
class RawSetting:
    key: str  # "SECTION/key" as written (section upper-cased for SUBGROUP profiles)
    raw: str
    source: str
    base_dir: Path | None


def _strip_comment(text: str) -> str:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return text[:i].rstrip()
    return text.rstrip()


def parse_config_text(text: str, filename: str = "<string>") -> list[RawSetting]:
    """Parse GetPot-style config text into ``SECTION/key`` settings with their file:line."""
    settings: list[RawSetting] = []
    base_dir = Path(filename).resolve().parent if filename not in ("<string>", "") else None
    section: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        m = _SECTION_RE.match(line)
        if m:
            section = _normalise_section(m.group(1))
            continue
        m = _KEY_RE.match(line)
        if not m:
            raise ConfigError(
                f"cannot parse {line!r}: expected '[SECTION]' or 'key = value'", source=f"{filename}:{lineno}"
            )
        if section is None:
            raise ConfigError(
                f"key {m.group(1)!r} appears before any [SECTION] header", source=f"{filename}:{lineno}"
            )
        name, value = m.group(1), m.group(2).strip()
        if value.startswith("'") or value.startswith('"'):
            quote = value[0]
            body = value[1:]
            if quote in body:
                end = body.index(quote)
                rest = body[end + 1:].strip()
                if rest and not rest.startswith("#"):
                    raise ConfigError(f"unexpected text {rest!r} after the closing quote",
                                      source=f"{filename}:{lineno}", key=f"{section}/{name}")
                value = body[:end]
            else:
                # a quoted value that spans lines, as GetPot allows for json_layout = '...'
                parts = [body]
                while True:
                    if i >= len(lines):
                        raise ConfigError(f"the quoted value opened here is never closed with {quote}",
                                          source=f"{filename}:{lineno}", key=f"{section}/{name}")
                    nxt = lines[i]
                    i += 1
                    if quote in nxt:
                        end = nxt.index(quote)
                        parts.append(nxt[:end])
                        rest = nxt[end + 1:].strip()
                        if rest and not rest.startswith("#"):
                            raise ConfigError(f"unexpected text {rest!r} after the closing quote",
                                              source=f"{filename}:{i}", key=f"{section}/{name}")
                        break
                    parts.append(nxt)
                value = "\n".join(parts)
        else:
            value = _strip_comment(value)
        settings.append(RawSetting(f"{section}/{name}", value, f"{filename}:{lineno}", base_dir))
    return settings


def _normalise_section(section: str) -> str:
    parts = section.split("/")
    if parts[0].upper() == "SUBGROUP":
        # profile names are upper-cased, as Derecho's make_subview does
        return "/".join(p.upper() for p in parts)
    return section


# ----------------------------------------------------------------------------- resolution


def _canonical_key(key: str, source: str) -> tuple[str, str | None]:
    """Map a user-written key to its table name; return (name, alias used or None)."""
    if key in ALIASES:
        new, warn = ALIASES[key]
        if warn:
            log.warning("%s: %s is deprecated; use %s instead", source, key, new)
        return new, key
    parts = key.split("/")
    if len(parts) == 3 and parts[0].upper() == "SUBGROUP":
        return f"SUBGROUP/{parts[1].upper()}/{parts[2]}", None
    return key, None


def _key_spec(name: str, source: str) -> Key | None:
    """The Key describing ``name``, None for an application section; errors for typos."""
    parts = name.split("/")
    section = parts[0]
    if section == "SUBGROUP":
        if len(parts) != 3:
            raise ConfigError("profile keys are written SUBGROUP/<PROFILE>/key, e.g. [SUBGROUP/LARGE] "
                              "window_size = 3", source=source, key=name)
        spec = PROFILE_KEYS.get(parts[2])
        if spec is None:
            raise ConfigError(_unknown_key_message(parts[2], list(PROFILE_KEYS), f"[SUBGROUP/{parts[1]}]"),
                              source=source, key=name)
        return spec
    if section in SECTIONS:
        spec = KEY_TABLE.get(name)
        if spec is None:
            known = [k.short for k in KEYS if k.section == section]
            known += [a.split("/", 1)[1] for a in ALIASES if a.startswith(section + "/")]
            raise ConfigError(_unknown_key_message(parts[-1], known, f"[{section}]"), source=source, key=name)
        return spec
    close = difflib.get_close_matches(section.upper(), SECTIONS, n=1, cutoff=0.75)
    if close and close[0] != section:
        raise ConfigError(f"unknown section [{section}]; did you mean [{close[0]}]?", source=source, key=name)
    return None  # an application's own section: kept as text


def _unknown_key_message(short: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(short, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {short!r} in {where}; {hint}known keys: {', '.join(sorted(known))}"


def _find_file(explicit: str | os.PathLike[str] | None, env_var: str, default_name: str,
               environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"configuration file {str(path)!r} does not exist or is not a regular file")
        return path
    env = environ.get(env_var)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"${env_var} names {env!r}, which does not exist or is not a regular file; "
                              f"fix the path or unset {env_var}")
        return path
    path = Path(default_name)
    return path if path.is_file() else None


def _read_file(path: Path) -> list[RawSetting]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc}") from exc
    return parse_config_text(text, str(path))


def parse_command_line(argv: Sequence[str]) -> tuple[list[RawSetting], list[str]]:
    """Split ``argv`` into config settings and the application's arguments.

    With a literal ``--``, everything before the last one is Derecho options and
    everything after it belongs to the application (Derecho's convention).
    Without one, the ``--SECTION/key[=value]`` items are taken as options and the
    rest is left to the application.
    """
    argv = list(argv)
    if "--" in argv:
        cut = len(argv) - 1 - argv[::-1].index("--")
        opts, app = argv[:cut], argv[cut + 1:]
        strict = True
    else:
        opts, app = argv, []
        strict = False
    settings: list[RawSetting] = []
    rest: list[str] = []
    i = 0
    while i < len(opts):
        item = opts[i]
        i += 1
        if item == "--":
            continue
        if item.startswith("--") and "/" in item.split("=", 1)[0]:
            body = item[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                if i >= len(opts) or (opts[i].startswith("--") and "/" in opts[i]):
                    raise ConfigError(f"option --{body} needs a value (--{body}=VALUE or --{body} VALUE)",
                                      source="command line", key=body)
                key, value = body, opts[i]
                i += 1
            settings.append(RawSetting(key, value, "command line", Path.cwd()))
        elif strict:
            raise ConfigError(f"unexpected argument {item!r} before '--': Derecho options are written "
                              "--SECTION/key=value; application arguments go after '--'",
                              source="command line")
        else:
            rest.append(item)
    return settings, rest + app


# ----------------------------------------------------------------------------- Conf


class Conf:
    """The effective configuration of one node.

    Build it with :meth:`load` or :meth:`parse_args`; read it with :meth:`get`.
    """

    def __init__(self) -> None:
        self._values: dict[str, _Value] = {
            k.name: _Value(k.default, "default") for k in KEYS
        }
        self._app: dict[str, _Value] = {}
        self.files: list[Path] = []

    # ------------------------------------------------------------ construction
    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None,
             node_config_file: str | os.PathLike[str] | None = None,
             argv: Sequence[str] | None = None,
             overrides: Mapping[str, Any] | None = None,
             *, environ: Mapping[str, str] | None = None) -> "Conf":
        """Defaults, then the group file, the node file, ``argv`` and ``overrides``.

        ``argv`` holds ``--SECTION/key=value`` items only (use :meth:`parse_args`
        for a program's whole command line).
        """
        environ = os.environ if environ is None else environ
        conf = cls()
        layers: list[list[RawSetting]] = []
        for explicit, env_var, default in ((config_file, CONF_FILE_ENV, DEFAULT_CONF_FILE),
                                           (node_config_file, NODE_CONF_FILE_ENV, DEFAULT_NODE_CONF_FILE)):
            path = _find_file(explicit, env_var, default, environ)
            if path is not None:
                conf.files.append(path)
                layers.append(_read_file(path))
        if argv:
            cli, extra = parse_command_line(argv)
            if extra:
                raise ConfigError(f"unexpected arguments {extra!r}: Conf.load takes --SECTION/key=value "
                                  "items only; use Conf.parse_args for a whole command line",
                                  source="command line")
            layers.append(cli)
        if overrides:
            layers.append([RawSetting(k, v if isinstance(v, str) else _to_raw(v), "override", None)
                           for k, v in overrides.items()])
        if not conf.files and not argv and not overrides:
            log.debug("no derecho.cfg or derecho_node.cfg found and no options given: using defaults")
        for layer in layers:
            for setting in layer:
                conf._set_raw(setting)
        conf._validate()
        return conf

    @classmethod
    def parse_args(cls, argv: Sequence[str] | None = None, *,
                   config_file: str | os.PathLike[str] | None = None,
                   node_config_file: str | os.PathLike[str] | None = None,
                   overrides: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> tuple["Conf", list[str]]:
        """Read a program's arguments (``sys.argv[1:]`` by default): ``[options --] app-args``.

        Returns the conf and the application's own arguments.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        settings, app_args = parse_command_line(argv)
        cli_argv = [f"--{s.key}={s.raw}" for s in settings]
        conf = cls.load(config_file, node_config_file, cli_argv, overrides, environ=environ)
        return conf, app_args

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Conf":
        """A copy with ``overrides`` applied (handy for several nodes in one process)."""
        new = Conf()
        new._values = {k: _Value(v.value, v.source, v.raw, v.given_as, v.base_dir) for k, v in self._values.items()}
        new._app = dict(self._app)
        new.files = list(self.files)
        for k, v in overrides.items():
            new._set_raw(RawSetting(k, v if isinstance(v, str) else _to_raw(v), "override", None))
        new._validate()
        return new

    def _set_raw(self, setting: RawSetting) -> None:
        name, alias = _canonical_key(setting.key, setting.source)
        spec = _key_spec(name, setting.source)
        if spec is None:
            self._app[name] = _Value(setting.raw, setting.source, setting.raw, None, setting.base_dir)
            return
        try:
            value = spec.parse(setting.raw)
        except ValueError as exc:
            raise ConfigError(str(exc), source=setting.source,
                              key=alias or setting.key) from None
        self._values[name] = _Value(value, setting.source, setting.raw, alias, setting.base_dir)

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        v = self._values
        local_id, max_id = v["DERECHO/local_id"], v["DERECHO/max_node_id"]
        if local_id.value >= max_id.value:
            blame = local_id if local_id.source != "default" else max_id
            raise ConfigError(f"local_id ({local_id.value}) must be less than max_node_id ({max_id.value})",
                              source=blame.source,
                              key="DERECHO/local_id" if blame is local_id else "DERECHO/max_node_id")
        leaders, ports = v["DERECHO/restart_leaders"], v["DERECHO/restart_leader_ports"]
        if len(leaders.value) != len(ports.value):
            blame = leaders if leaders.source != "default" else ports
            raise ConfigError(
                f"restart_leaders has {len(leaders.value)} entries but restart_leader_ports has "
                f"{len(ports.value)}; give one port per restart leader",
                source=blame.source, key="DERECHO/restart_leaders" if blame is leaders else "DERECHO/restart_leader_ports")
        js, jf = v["LAYOUT/json_layout"], v["LAYOUT/json_layout_file"]
        if js.value and jf.value:
            raise ConfigError(f"json_layout ({js.source}) and json_layout_file ({jf.source}) are exclusive; "
                              "keep one", source=jf.source, key="LAYOUT/json_layout_file")
        if jf.value:
            path = self.json_layout_path()
            assert path is not None
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL byte in the path
                raise ConfigError(f"cannot read layout file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}",
                                  source=jf.source, key="LAYOUT/json_layout_file") from None
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"layout file {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno})", source=jf.source, key="LAYOUT/json_layout_file") from None
            except (RecursionError, ValueError) as exc:  # nested too deeply, a number of 4300+ digits
                raise ConfigError(f"layout file {str(path)!r} is not valid JSON ({exc or 'nested too deeply'})",
                                  source=jf.source, key="LAYOUT/json_layout_file") from None

    # ------------------------------------------------------------ reading
    def get(self, key: str, default: Any = ...) -> Any:
        """The typed value of ``SECTION/key`` (``SUBGROUP/<PROFILE>/key`` for profiles).

        A profile other than DEFAULT inherits DEFAULT's multicast keys it does
        not set. Unset optional keys (``num_shards`` ...) return ``default`` or
        raise :class:`ConfigError` when no default is given.
        """
        name, _ = _canonical_key(key, "get")
        entry = self._lookup(name)
        if entry is None or entry.value is None:
            if default is not ...:
                return default
            if entry is None and not self._is_known(name):
                _key_spec(name, "lookup")  # raises with a did-you-mean for known sections
                raise ConfigError("no such key in the configuration", key=key)
            raise ConfigError("not set in any configuration file or on the command line", key=key)
        return entry.value

    def _is_known(self, name: str) -> bool:
        parts = name.split("/")
        return name in self._values or (len(parts) == 3 and parts[0] == "SUBGROUP" and parts[2] in PROFILE_KEYS)

    def _lookup(self, name: str) -> _Value | None:
        if name in self._values:
            return self._values[name]
        if name in self._app:
            return self._app[name]
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "SUBGROUP" and parts[2] in PROFILE_INHERITED:
            return self._values.get(f"SUBGROUP/DEFAULT/{parts[2]}")
        return None

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def __contains__(self, key: str) -> bool:
        name, _ = _canonical_key(key, "contains")
        entry = self._lookup(name)
        return entry is not None and entry.value is not None

    def source(self, key: str) -> str:
        """Where the effective value of ``key`` came from: default, file:line, command line, override."""
        name, _ = _canonical_key(key, "source")
        entry = self._lookup(name)
        if entry is None:
            raise ConfigError("no such key in the configuration", key=key)
        parts = name.split("/")
        if name not in self._values and len(parts) == 3 and parts[0] == "SUBGROUP":
            return f"inherited from SUBGROUP/DEFAULT ({entry.source})"
        return entry.source

    def profiles(self) -> list[str]:
        """Every SUBGROUP profile named in the configuration; DEFAULT first."""
        names = {k.split("/")[1] for k in self._values if k.startswith("SUBGROUP/")}
        return ["DEFAULT"] + sorted(names - {"DEFAULT"})

    def profile(self, name: str = "DEFAULT") -> dict[str, Any]:
        """The six multicast keys of a profile (and num_shards/min_nodes/max_nodes when set)."""
        name = name.upper()
        out = {k: self.get(f"SUBGROUP/{name}/{k}") for k in PROFILE_INHERITED}
        for k in ("num_shards", "min_nodes", "max_nodes"):
            val = self.get(f"SUBGROUP/{name}/{k}", None)
            if val is not None:
                out[k] = val
        return out

    def json_layout_path(self) -> Path | None:
        """``LAYOUT/json_layout_file`` resolved against the file that set it."""
        entry = self._values["LAYOUT/json_layout_file"]
        if not entry.value:
            return None
        path = Path(entry.value).expanduser()
        if not path.is_absolute() and entry.base_dir is not None:
            path = entry.base_dir / path
        return path

    def json_layout(self) -> str | None:
        """The JSON layout text from json_layout or json_layout_file, or None."""
        inline: str = self._values["LAYOUT/json_layout"].value
        if inline:
            return inline
        path = self.json_layout_path()
        return path.read_text(encoding="utf-8") if path is not None else None

    def log_level(self, layer: str) -> str:
        """The effective level of a layer's logger (sst, rpc, viewmanager, persistence)."""
        own: str = self.get(f"LOGGER/{layer}_log_level")
        default: str = self.get("LOGGER/default_log_level")
        return own or default

    def items(self) -> Iterator[tuple[str, Any, str]]:
        """Every effective ``(key, value, source)``, in table order, then profiles and app sections."""
        for k in KEYS:
            if not k.name.startswith("SUBGROUP/"):
                yield k.name, self._values[k.name].value, self._values[k.name].source
        for profile in self.profiles():
            for short in PROFILE_KEYS:
                name = f"SUBGROUP/{profile}/{short}"
                if name in self._values or profile == "DEFAULT" or short in PROFILE_INHERITED:
                    entry = self._lookup(name)
                    assert entry is not None
                    yield name, entry.value, self.source(name)
        for name, entry in sorted(self._app.items()):
            yield name, entry.value, entry.source

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v, _ in self.items()}

    def alias_used(self, key: str) -> str | None:
        """The old name the user wrote for ``key`` (leader_ip ...), if any."""
        entry = self._values.get(key)
        return entry.given_as if entry else None

    def __repr__(self) -> str:
        changed = {k: v.value for k, v in self._values.items() if v.source != "default"}
        return f"Conf({changed!r})"


def _to_raw(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def iter_keys() -> Iterable[Key]:
    """The key table, for generated documentation."""
    return iter(KEYS)
