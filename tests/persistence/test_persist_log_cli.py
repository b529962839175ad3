"""``derecho log``: list, show (versions, values at a version / time / index), verify."""

from __future__ import annotations

import json

import pytest

from derecho_core import Persistent, PersistentRegistry
from derecho_core.cli import main
from derecho_core.storage import save_object

pytestmark = pytest.mark.timeout(30)

T0 = 1764300000000000


class Opaque:
    """A type the log command can import (this test module is importable while pytest runs)."""

    def __init__(self):
        self.n = 0


@pytest.fixture
def logdir(conf):
    reg = PersistentRegistry("app.KV-0-0", conf)
    kv = Persistent(dict, reg, "kv")
    for v in range(1, 6):
        kv.value[f"k{v}"] = v
        reg.make_version((1 << 32) | v, T0 + v * 1000)
    reg.close()
    save_object(conf, "View", b"view bytes")
    return conf.get("PERS/file_path")


def run(capsys, *argv):
    rc = main(["log", "--path", str(argv[0]), *argv[1:]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list(logdir, capsys):
    rc, out, _ = run(capsys, logdir, "list")
    assert rc == 0
    assert "app.KV-0-0.kv" in out and "4294967297..4294967301" in out and "2025-11-28T03:20:00.001000" in out
    rc, out, _ = run(capsys, logdir, "--json", "list")
    assert json.loads(out)["logs"][0]["entries"] == 5


def test_show_versions_and_values(logdir, capsys):
    rc, out, _ = run(capsys, logdir, "show", "app.KV-0-0.kv")
    assert rc == 0 and out.count("\n") == 6 and "1:3" in out
    rc, out, _ = run(capsys, logdir, "show", "app.KV-0-0.kv", "--version", str((1 << 32) | 3))
    assert "{'k1': 1, 'k2': 2, 'k3': 3}" in out
    rc, out, _ = run(capsys, logdir, "show", "app.KV-0-0.kv", "--time", str(T0 + 2500))
    assert "{'k1': 1, 'k2': 2}" in out
    rc, out, _ = run(capsys, logdir, "show", "app.KV-0-0.kv", "--time", "2025-11-28T03:20:00.004")
    assert "'k4': 4}" in out
    rc, out, _ = run(capsys, logdir, "--json", "show", "app.KV-0-0.kv", "--index", "-1")
    assert json.loads(out)["value"] == {f"k{v}": v for v in range(1, 6)}
    rc, _, err = run(capsys, logdir, "show", "nope")
    assert rc == 1 and "no log 'nope'" in err


def test_show_hex_when_the_type_cannot_be_imported(conf, capsys):
    reg = PersistentRegistry("X-0-0", conf)
    Persistent(Opaque, reg, "o")
    reg.make_version(1, T0)
    reg.close()
    path = conf.get("PERS/file_path")
    rc, out, _ = run(capsys, path, "show", "X-0-0.o", "--version", "1")
    assert "Opaque object" in out  # importable here: decoded
    data = (conf.get("PERS/file_path") + "/X-0-0.o.data")
    raw = open(data, "rb").read().replace(b"Opaque", b"Absent")
    # rewrite the value under a type name nobody can import, keeping the checksums right
    from derecho_storage_file import FileLogStore

    payload = raw[raw.index(b"M\xc7"):]
    log = FileLogStore(path, "X-0-0.o", reset=True)
    log.append(1, T0, payload)
    log.close()
    rc, out, _ = run(capsys, path, "show", "X-0-0.o", "--version", "1")
    assert rc == 0 and "not decoded" in out and "hex: 4d" in out


def test_verify(logdir, capsys):
    rc, out, _ = run(capsys, logdir, "verify")
    assert rc == 0 and "OK       app.KV-0-0.kv: 5 entries" in out and "View.nolog" in out
    data = f"{logdir}/app.KV-0-0.kv.data"
    with open(data, "ab") as f:
        f.write(b"torn")
    rc, out, _ = run(capsys, logdir, "verify")
    assert rc == 0 and "TORN" in out
    with open(data, "r+b") as f:
        f.seek(16 + 48 + 2)
        f.write(b"\xff")
    rc, out, _ = run(capsys, logdir, "verify", "app.KV-0-0.kv")
    assert rc == 1 and "CORRUPT" in out and "offset 16" in out
