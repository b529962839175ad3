"""Five hosts in network namespaces, two cut off (group membership, acceptance 3)."""

from __future__ import annotations

import time

import pytest

from derecho_core.testing.netns import Hosts, netns_unavailable_reason
from derecho_core.testing.processes import Member

REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PORTS = {"gms_port": 23580, "state_transfer_port": 28366, "sst_port": 37683, "rdmc_port": 31675,
         "external_port": 32645}  # Derecho's defaults: every host has its own port space


@pytest.mark.timeout(180)
def test_two_of_five_cut_off(tmp_path):
    with Hosts(5) as hosts:
        conf = tmp_path / "derecho.cfg"
        conf.write_text(f"[DERECHO]\ncontact_ip = {hosts.addresses[0]}\ncontact_port = 23580\n"
                        "heartbeat_ms = 50\nsuspicion_timeout_ms = 800\n[LOGGER]\ndefault_log_level = warning\n")
        members = []
        try:
            for i in range(5):
                members.append(Member(i, PORTS, conf, host=hosts.addresses[i], netns=hosts.hosts[i]))
                members[i].wait_for_view(range(i + 1), timeout=30)
            for m in members:
                m.wait_for_view(range(5), timeout=30)
            before = {i: len(members[i].views()) for i in (3, 4)}
            hosts.cut(3)
            hosts.cut(4)
            for i in (0, 1, 2):
                members[i].wait_for_view([0, 1, 2], timeout=30)
            for i in (3, 4):
                assert members[i].wait_exit(timeout=30) == 3
                text = "".join(members[i].stderr)
                assert "minority" in text and "partition" in text, text
                assert len(members[i].views()) == before[i], "a minority node installed a view of its own"
            hosts.reconnect(3)
            hosts.reconnect(4)
            time.sleep(1.0)
            assert members[0].views()[-1]["members"] == [0, 1, 2]
        finally:
            for m in members:
                m.kill()
