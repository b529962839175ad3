"""Real member processes on 127.0.0.1, once per installed transport plugin (group membership, acceptance 2)."""

from __future__ import annotations

import pytest

from derecho_core import plugins
from derecho_core.testing.processes import LocalGroup

PROVIDERS = ["sockets", "tcp"]


def provider_params():
    for name in PROVIDERS:
        try:
            plugins.transport(name)
        except Exception as exc:
            yield pytest.param(name, marks=pytest.mark.skip(reason=f"transport {name!r} unavailable: {exc}"))
        else:
            yield pytest.param(name)


@pytest.fixture
def group(tmp_path, request):
    provider = request.param
    extra = ["--RDMA/domain=lo"] if provider != "sockets" else []
    g = LocalGroup(tmp_path, provider, extra=extra)
    yield g
    g.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("group", list(provider_params()), indirect=True)
def test_five_nodes_crash_restart_and_id_in_use(group):
    members = {}
    for node in range(5):
        members[node] = group.start(node)
        members[node].wait_for_view(range(node + 1), timeout=30)
    for node in range(5):
        members[node].wait_for_view(range(5), timeout=30)

    # SIGKILL a non-leader: the four survivors install a view without it
    members[3].kill()
    for node in (0, 1, 2, 4):
        members[node].wait_for_view([0, 1, 2, 4], timeout=30)

    # SIGKILL the leader: the three survivors take over
    members[0].kill()
    for node in (1, 2, 4):
        members[node].wait_for_view([1, 2, 4], timeout=30)

    # the killed node restarted with its id rejoins (through node 1, now leader; the contact redirects
    # or, being dead, is replaced by node 1's address)
    group.settings["DERECHO/contact_port"] = group.ports_of(1)["gms_port"]
    group.write_conf()
    members[3] = group.start(3)
    for node in (1, 2, 3, 4):
        members[node].wait_for_view([1, 2, 3, 4], timeout=30)

    # a second process claiming id 2 is refused with ID_IN_USE
    rogue = group.start_extra(2)
    code = rogue.wait_exit(timeout=30)
    assert code == 4, rogue.stderr
    assert any("ID_IN_USE" in line for line in rogue.stderr), rogue.stderr
    # and the group did not change
    assert members[1].views()[-1]["members"] == [1, 2, 4, 3]
