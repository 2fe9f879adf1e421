#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for CI and for trying the slurm/ scripts locally.
#
#   bash tools/ci/slurm_up.sh          # install (Debian packages) if missing, configure, start, wait until idle
#   bash tools/ci/slurm_up.sh --down   # stop the daemons this script started
#
# Runs as root (or through sudo) on Debian/Ubuntu without systemd: munged, slurmctld and slurmd are started
# by hand. The node offers this host's CPUs and memory as `slurmd -C` reports them. Idempotent: when the
# daemons already run with the same configuration and the node is up it returns at once; otherwise it
# (re)starts what is missing. On failure it prints the daemons' logs.
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

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "slurm_up: needs root (or sudo)" >&2; exit 1; }
    SUDO=sudo
fi

log() { echo "slurm_up: $*" >&2; }

show_logs() {
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
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

if [ "${1:-}" = "--down" ]; then
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
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

# ---- this host: name (must resolve: the rendezvous endpoint is the first host of the node list) and size
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    log "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" | $SUDO tee -a /etc/hosts >/dev/null
fi
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
# Written by tools/ci/slurm_up.sh: a one-node cluster on $HOST.
ClusterName=llmdist
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): short here, for tests.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
$SUDO mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
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
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    log "starting slurmctld ($CPUS CPUs, ${MEM} MB on $HOST)"
    # -c: forget jobs of an earlier instance (they cannot be running any more: slurmd was down too).
    $SUDO slurmctld -c || fail "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || fail "slurmctld does not answer"
if ! pid_alive "$RUN_DIR/slurmd.pid"; then
    log "starting slurmd"
    $SUDO slurmd || fail "slurmd did not start"
fi

# ---- wait for the node; a node left down/drained by an earlier instance is resumed
deadline=$((SECONDS + WAIT_S))
while :; do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        drained*|draining|down*)
            $SUDO scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    [ $SECONDS -ge $deadline ] && fail "node $HOST is '${state:-not listed}' after ${WAIT_S}s (expected idle)"
    sleep 0.5
done
log "cluster up: node $HOST $state, $CPUS CPUs, ${MEM} MB (partition debug)"
