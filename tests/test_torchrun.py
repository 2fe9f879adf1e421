"""llm_dist.torchrun: the one line for a rendezvous that failed (the real failure: tests/multinode)."""

from __future__ import annotations

import socket

from torch.distributed import DistNetworkError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousTimeoutError,
)

from llm_dist.torchrun import rdzv_timeouts, rendezvous_failure


def test_rdzv_timeouts_read_torchruns_conf_with_its_defaults():
    assert rdzv_timeouts("") == (60, 600)
    assert rdzv_timeouts("read_timeout=5,join_timeout=30,last_call_timeout=2") == (5, 30)


def test_unreachable_store_names_endpoint_timeout_and_torchs_reason():
    err = RendezvousConnectionError("The connection to the C10d store has failed. See inner exception for details.")
    err.__cause__ = DistNetworkError("The client socket has timed out after 5000ms while trying to connect to "
                                     "(node9, 29400).\nmore detail")
    line = rendezvous_failure(err, "node9:29400", "read_timeout=5", "2")
    assert line == (f"error: {socket.gethostname()}: cannot reach the rendezvous endpoint node9:29400 within "
                    "read_timeout=5s (The client socket has timed out after 5000ms while trying to connect to "
                    "(node9, 29400).); check the host and port, and that torchrun runs on that host")


def test_nodes_missing_from_the_rendezvous_name_the_join_timeout():
    line = rendezvous_failure(RendezvousTimeoutError(), "node0:29400", "join_timeout=30", "4")
    assert "the rendezvous at node0:29400 did not gather 4 node(s) within join_timeout=30s" in line
    assert "\n" not in line
