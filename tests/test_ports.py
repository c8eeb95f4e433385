"""Every service gets a port of its own: picked ports differ, and a taken port is refused."""

from __future__ import annotations

import pytest

from titan_rl.launcher import free_ports
from titan_rl.rpc import make_server


def test_ports_picked_together_all_differ():
    ports = free_ports(["127.0.0.1"] * 64)
    assert len(set(ports)) == 64


def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it():
    """With gRPC's default SO_REUSEPORT the second bind succeeded and the kernel split connections
    between the two services (a CI run hung when buffer and trainer drew the same port)."""
    server, port, _ = make_server("127.0.0.1", 0)
    server.start()
    try:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
            make_server("127.0.0.1", port)
    finally:
        server.stop(grace=None)
