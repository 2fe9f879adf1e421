"""torchrun, with an unreachable rendezvous reported as one line instead of a page of C++ frames.

    python -m llm_dist.torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=node0:29400 --rdzv-conf=read_timeout=60,join_timeout=600 launch/pretrain.py ...

Exactly `torch.distributed.run` (same arguments, same agent, same exit codes), except when this node cannot
take part in the rendezvous: a wrong host or port, a firewall, or the first node not started. torchrun then
raises after its own timeouts, from `--rdzv-conf`:

  read_timeout  seconds to connect to the c10d store on the endpoint host (default 60), then
  join_timeout  seconds for the other nodes to join once connected (default 600).

and buries the reason under a traceback. Here the last line says which endpoint and which timeout:
`error: node1: cannot reach the rendezvous endpoint node9:29400 within read_timeout=60s (...)`, exit 2.
slurm/common.sh starts torchrun through this module.
"""

from __future__ import annotations

import socket
import sys

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from torch.distributed.run import get_args_parser, run

DEFAULT_READ_TIMEOUT_S = 60  # torch.distributed.elastic's c10d backend default
DEFAULT_JOIN_TIMEOUT_S = 600  # DynamicRendezvousHandler's default


def rdzv_timeouts(rdzv_conf: str) -> tuple[int, int]:
    """(read_timeout, join_timeout) in seconds from torchrun's `--rdzv-conf k=v,k=v` string."""
    conf = dict(kv.split("=", 1) for kv in rdzv_conf.split(",") if "=" in kv)
    return (int(conf.get("read_timeout", DEFAULT_READ_TIMEOUT_S)),
            int(conf.get("join_timeout", DEFAULT_JOIN_TIMEOUT_S)))


def rendezvous_failure(exc: BaseException, endpoint: str, rdzv_conf: str, min_nodes: str) -> str:
    """The one line for a rendezvous that failed on this node."""
    read_s, join_s = rdzv_timeouts(rdzv_conf)
    node = socket.gethostname()
    cause = exc.__cause__ or exc
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(exc, RendezvousTimeoutError):
        return (f"error: {node}: the rendezvous at {endpoint} did not gather {min_nodes} node(s) within "
                f"join_timeout={join_s}s; start torchrun on every node with the same --rdzv-endpoint and --rdzv-id")
    return (f"error: {node}: cannot reach the rendezvous endpoint {endpoint} within read_timeout={read_s}s "
            f"({reason}); check the host and port, and that torchrun runs on that host")


@record  # as torchrun's own main: a failed worker's error is summarised, then re-raised (exit 1)
def _torchrun(args) -> None:
    run(args)


def main(argv: list[str] | None = None) -> int:
    """Parse torchrun's arguments and run it; an unreachable rendezvous is one line and exit 2."""
    args = get_args_parser().parse_args(argv)
    try:
        _torchrun(args)
    except (RendezvousConnectionError, RendezvousTimeoutError) as e:
        print(rendezvous_failure(e, args.rdzv_endpoint, args.rdzv_conf, args.nnodes.split(":")[0]),
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
