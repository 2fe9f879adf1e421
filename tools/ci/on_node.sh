#!/usr/bin/env bash
# Run a command "on" a node of the cluster made by tools/ci/cluster_up.sh: in its network namespace, under
# its hostname (a UTS namespace of its own), with gloo bound to the node's interface.
#
#   tools/ci/on_node.sh node1 python -m torch.distributed.run --nnodes=2 ... --rdzv-endpoint=node0:29400 ...
#
# The hostname matters: torchrun's c10d rendezvous decides whether this node hosts the store by comparing
# the endpoint with the hostname, and tells the workers the address of rank 0's host by its name.
set -euo pipefail
node=${1:?usage: on_node.sh NODE CMD ...}
shift
[[ "$node" =~ ^node([0-9]+)$ ]] || { echo "on_node: node names are node0, node1, ...; got '$node'" >&2; exit 2; }
ns=llmd-node${BASH_REMATCH[1]}
[[ " $(ip netns list | awk '{print $1}' | tr '\n' ' ') " == *" $ns "* ]] \
    || { echo "on_node: no namespace $ns: run 'bash tools/ci/cluster_up.sh' first" >&2; exit 2; }
export GLOO_SOCKET_IFNAME=llmd0
# nsenter --net rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup (slurmd needs
# it); unshare --uts: a hostname for this node only; the shell sets it, then becomes the command.
exec nsenter --net="/run/netns/$ns" unshare --uts -- bash -c 'hostname "$0" && exec "$@"' "$node" "$@"
