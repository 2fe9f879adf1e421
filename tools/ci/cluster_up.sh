#!/usr/bin/env bash
# Several "hosts" on this machine: one network namespace per node, for CI and for trying multi-node runs.
#
#   bash tools/ci/cluster_up.sh [N]      # N nodes (default: as many as exist, else 2): node0 .. node<N-1>
#   bash tools/ci/cluster_up.sh --down   # remove the namespaces, the bridge and the /etc/hosts lines
#   tools/ci/on_node.sh node1 CMD ...    # run CMD "on" node1 (its network namespace and hostname)
#
# Layout (one fixed private subnet, 10.213.0.0/24, created and removed here):
#   bridge llmd-br0 in the root namespace, address 10.213.0.254 ("llmd-head": where slurmctld listens)
#   node i: namespace llmd-node<i>, interface llmd0 = 10.213.0.<i+1>/24 (a veth pair into the bridge),
#           loopback up, hostname node<i> in /etc/hosts
# No route or NAT leaves the subnet: traffic stays between the namespaces (and the root namespace's bridge
# address). The filesystem is shared, as cluster nodes share NFS. Each node runs its processes under its own
# hostname (a UTS namespace, set by on_node.sh), so torchrun's rendezvous sees node0, node1, ... as hosts.
# Processes on a node use the interface llmd0: on_node.sh exports GLOO_SOCKET_IFNAME=llmd0 (on a real cluster,
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the interface of the cluster network; see README "Multi-node").
#
# Runs as root (CI does). Needs iproute2 (`ip`) and util-linux (`unshare`, `nsenter`).
set -euo pipefail

SUBNET_PREFIX=10.213.0
BRIDGE=llmd-br0
HEAD_ADDR=$SUBNET_PREFIX.254
HOSTS_TAG="# llm_dist cluster_up.sh"
MAX_NODES=16

log() { echo "cluster_up: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root (network namespaces)"; exit 1; }
if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null || ! command -v unshare >/dev/null; then
    command -v apt-get >/dev/null || { log "needs iproute2 ('ip') and util-linux ('nsenter', 'unshare')"; exit 1; }
    log "installing iproute2 util-linux"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 util-linux >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             iproute2 util-linux >/dev/null; }
fi

node_ns() { echo "llmd-node$1"; }

# Remove every namespace, link and /etc/hosts line this script made (any N).
down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^llmd-node[0-9]*$' || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true  # processes left on the node
        ip netns delete "$ns"
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
    for link in $(ip -o link show 2>/dev/null | sed -n 's/^[0-9]*: \(llmd-v[0-9]*\)@.*/\1/p'); do
        ip link delete "$link" 2>/dev/null || true
    done
    if grep -q "$HOSTS_TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite in place, never replace the file.
        local kept; kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    return 0
}

if [ "${1:-}" = "--down" ]; then
    down
    log "cluster removed"
    exit 0
fi

have=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c '^llmd-node[0-9]*$' || true)
# No count given: keep the running cluster's size (slurm_up.sh calls this script too), else 2.
N=${1:-${CLUSTER_NODES:-$([ "$have" -gt 0 ] && echo "$have" || echo 2)}}
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le $MAX_NODES ] \
    || { log "number of nodes must be 1..$MAX_NODES, got '$N'"; exit 2; }

# A node count different from the running cluster's: start over.
if [ "$have" -ne 0 ] && [ "$have" -ne "$N" ]; then
    log "$have node(s) exist, $N asked: recreating"
    down
fi

# The bridge in the root namespace (its address lets slurmctld, running there, reach every node).
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
fi
[[ "$(ip addr show dev "$BRIDGE")" == *"inet $HEAD_ADDR/"* ]] || ip addr add "$HEAD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

hosts="$HEAD_ADDR llmd-head $HOSTS_TAG"
for i in $(seq 0 $((N - 1))); do
    ns=$(node_ns "$i") addr=$SUBNET_PREFIX.$((i + 1)) host_if=llmd-v$i
    [[ " $(ip netns list | awk '{print $1}' | tr '\n' ' ') " == *" $ns "* ]] || ip netns add "$ns"
    if ! ip -n "$ns" link show llmd0 >/dev/null 2>&1; then
        ip link delete "$host_if" 2>/dev/null || true
        ip link add "$host_if" type veth peer name llmd0 netns "$ns"
    fi
    ip link set "$host_if" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    [[ "$(ip -n "$ns" addr show dev llmd0)" == *"inet $addr/"* ]] || ip -n "$ns" addr add "$addr/24" dev llmd0
    ip -n "$ns" link set llmd0 up
    hosts+=$'\n'"$addr node$i $HOSTS_TAG"
done

# /etc/hosts: our lines, replaced as a block (rewritten in place: it may be a bind mount).
current=$(grep "$HOSTS_TAG" /etc/hosts || true)
if [ "$current" != "$hosts" ]; then
    kept=$(grep -v "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n%s\n' "$kept" "$hosts" >/etc/hosts
fi

# Every node reaches every other one (and the head) before we say "up": a TCP connect to a closed port is
# refused at once by a reachable host (no ping needed), and times out on an unreachable one.
targets="$HEAD_ADDR"
for j in $(seq 0 $((N - 1))); do targets+=" $SUBNET_PREFIX.$((j + 1))"; done
for i in $(seq 0 $((N - 1))); do
    ip netns exec "$(node_ns "$i")" python3 - $targets <<'PY' || { log "node$i cannot reach every node"; exit 1; }
import socket, sys, time
for target in sys.argv[1:]:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((target, 9), timeout=1).close()
            break
        except ConnectionRefusedError:
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"cluster_up: {target} unreachable: {e}")
            time.sleep(0.2)
PY
done
log "cluster up: $N node(s) node0..node$((N - 1)) on $SUBNET_PREFIX.0/24 (head $HEAD_ADDR); run with tools/ci/on_node.sh"
