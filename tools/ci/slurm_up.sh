#!/usr/bin/env bash
# A SLURM cluster of SLURM_NODES nodes (default 2) on this machine, for CI and for trying the slurm/ scripts.
#
#   bash tools/ci/slurm_up.sh          # install (Debian packages) if missing, configure, start, wait until idle
#   bash tools/ci/slurm_up.sh --down   # stop the daemons this script started (the namespaces stay)
#
# The nodes are the network namespaces of tools/ci/cluster_up.sh (called here when they are missing):
# node<i> at 10.213.0.<i+1>, one slurmd in each, started by tools/ci/on_node.sh so that it and its jobs run
# under the node's hostname and address. slurmctld runs in the root namespace and listens on the bridge
# address 10.213.0.254, which every node reaches. A multi-node job's steps therefore run on separate
# network stacks and talk over the subnet, as on a real cluster; the filesystem is shared, as NFS would be.
#
# Runs as root (or through sudo) on Debian/Ubuntu without systemd: munged, slurmctld and the slurmds are
# started by hand. Each node offers this host's CPUs and memory as `slurmd -C` reports them (the nodes
# share them: jobs on both nodes compete for the same cores). Idempotent: when the daemons already run with
# the same configuration and the nodes are up it returns at once; otherwise it (re)starts what is missing.
# On failure it prints the daemons' logs.
#
# Plugins are chosen to need nothing from the host: proctrack/linuxproc (the process tree from /proc; no
# cgroups, so it also works in containers), task/none, select/cons_tres (CPUs as consumable, GPUs by
# --gpus-per-node where a node has them), MpiDefault=none, no accounting database.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
WAIT_S=${SLURM_UP_WAIT_S:-60}
NODES=${SLURM_NODES:-2}
HEAD_ADDR=10.213.0.254  # tools/ci/cluster_up.sh's bridge address in the root namespace
HERE=$(cd "$(dirname "$0")" && pwd)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "slurm_up: needs root (or sudo)" >&2; exit 1; }
    SUDO=sudo
fi

log() { echo "slurm_up: $*" >&2; }

show_logs() {
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-node*.log /var/log/munge/munged.log; do
        [ -f "$f" ] && { echo "----- tail $f" >&2; $SUDO tail -n 40 "$f" >&2; }
    done
    sinfo -N -l >&2 2>&1 || true
}

fail() { log "$*"; show_logs; exit 1; }

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
    [ -f "$1" ] && $SUDO kill -0 "$($SUDO cat "$1")" 2>/dev/null
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    if pid_alive "$2"; then
        local pid; pid=$($SUDO cat "$2")
        log "stopping $1 (pid $pid)"
        $SUDO kill "$pid"
        for _ in $(seq 50); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    $SUDO rm -f "$2"
}

stop_slurmds() {  # every node's slurmd (and the one-node layout's slurmd.pid of earlier versions)
    local f
    for f in "$RUN_DIR"/slurmd-node*.pid "$RUN_DIR/slurmd.pid"; do
        [ -e "$f" ] && stop_daemon "slurmd $(basename "$f" .pid)" "$f"
    done
    return 0
}

if [ "${1:-}" = "--down" ]; then
    stop_slurmds
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
    exit 0
fi

# ---- packages (Debian 12: Slurm 22.05)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # policy-rc.d may refuse to start services inside containers; that is fine, we start them by hand.
    $SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# ---- the nodes' namespaces (kept when they exist: cluster_up.sh with no count keeps the cluster's size)
[[ "$NODES" =~ ^[0-9]+$ ]] && [ "$NODES" -ge 1 ] || fail "SLURM_NODES must be a positive number, got '$NODES'"
have=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c '^llmd-node[0-9]*$' || true)
if [ "$have" -lt "$NODES" ]; then
    $SUDO bash "$HERE/cluster_up.sh" "$NODES" || fail "tools/ci/cluster_up.sh $NODES failed"
fi

# ---- this host (the controller's): its name must resolve; nodes reach it at the bridge address
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    log "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" | $SUDO tee -a /etc/hosts >/dev/null
fi
NODE_NAMES=$(seq -f 'node%g' 0 $((NODES - 1)) | paste -sd, -)
NODE_HW=$(slurmd -C | head -n1)  # NodeName=... CPUs=... Boards=... RealMemory=...
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
SOCKETS=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
CORES=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
THREADS=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
[ -n "$CPUS" ] && [ -n "$MEM" ] || fail "cannot read CPUs/memory from 'slurmd -C': $NODE_HW"
MEM=$((MEM * 95 / 100))  # a margin: a node reporting less memory than configured is drained

# ---- configuration (rewritten only when it changes, so a second run leaves running daemons alone)
CONF=$(cat <<EOF
# Written by tools/ci/slurm_up.sh: $NODES node(s) in network namespaces on $HOST (tools/ci/cluster_up.sh).
ClusterName=llmdist
SlurmctldHost=$HOST($HEAD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): short here, for tests.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR
# One slurmd per node on one machine: %n (the node name) keeps their files apart.
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Pending jobs (a requeued one once eligible) are looked at every few seconds instead of every minute.
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
KillWait=30
# sbatch --wait polls every 2 s while 2 >= MinJobAge/2 (else it backs off to 8 s, then 32 s), and a finished
# job is forgotten MinJobAge s after it ends: 4 keeps sbatch --wait prompt and still sees every job end.
MinJobAge=4
$(for i in $(seq 0 $((NODES - 1))); do
    echo "NodeName=node$i NodeAddr=10.213.0.$((i + 1)) CPUs=$CPUS Boards=1 SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN"
done)
PartitionName=debug Nodes=$NODE_NAMES Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
$SUDO mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
for i in $(seq 0 $((NODES - 1))); do $SUDO mkdir -p "$SPOOL_DIR/node$i"; done
CHANGED=0
if [ "$($SUDO cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$CONF" ]; then
    echo "$CONF" | $SUDO tee "$CONF_DIR/slurm.conf" >/dev/null
    CHANGED=1
fi

# ---- munge: a key, then the daemon (as the munge user, as its package intends)
if [ ! -s /etc/munge/munge.key ]; then
    log "creating a munge key"
    $SUDO mkdir -p /etc/munge
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pid_alive /run/munge/munged.pid; then
    log "starting munged"
    $SUDO runuser -u munge -- munged --force || fail "munged did not start"
fi
for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || fail "munge credentials do not round-trip"

# ---- the daemons (restarted when the configuration changed)
if [ "$CHANGED" = 1 ]; then
    stop_slurmds
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    log "starting slurmctld ($CPUS CPUs, ${MEM} MB on $HOST)"
    # -c: forget jobs of an earlier instance (they cannot be running any more: slurmd was down too).
    $SUDO slurmctld -c || fail "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || fail "slurmctld does not answer"
stop_daemon "slurmd (one-node layout)" "$RUN_DIR/slurmd.pid"  # left by an earlier version of this script
for i in $(seq 0 $((NODES - 1))); do
    if ! pid_alive "$RUN_DIR/slurmd-node$i.pid"; then
        log "starting slurmd on node$i"
        $SUDO bash "$HERE/on_node.sh" "node$i" slurmd -N "node$i" || fail "slurmd did not start on node$i"
    fi
done

# ---- wait for the nodes; a node left down/drained by an earlier instance is resumed
deadline=$((SECONDS + WAIT_S))
for i in $(seq 0 $((NODES - 1))); do
    while :; do
        state=$(sinfo -h -n "node$i" -o %T 2>/dev/null | head -n1)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            drained*|draining|down*)
                $SUDO scontrol update NodeName="node$i" State=RESUME 2>/dev/null || true ;;
        esac
        [ $SECONDS -ge $deadline ] && fail "node node$i is '${state:-not listed}' after ${WAIT_S}s (expected idle)"
        sleep 0.5
    done
done
log "cluster up: $NODES node(s) $NODE_NAMES, $CPUS CPUs and ${MEM} MB each, sharing this host's (partition debug)"
