#!/usr/bin/env bash
# Start (or verify) a single-node Slurm "cluster" on this machine for the test
# suite: munged + slurmctld + slurmd, all on $(hostname -s), partition "debug".
#
# Idempotent: if everything is already up it only verifies and exits 0.
#
# Exit codes:
#   0  cluster is up (node usable, smoke test passed)
#   3  slurm/munge cannot be installed here (no apt / apt failed / not root);
#      tests treat this as "skip"
#   1  anything else went wrong (log tails are printed on stderr)
#
# Environment:
#   SLURM_CONF                 config path (default /etc/slurm/slurm.conf)
#   START_CLUSTER_WAIT         seconds to wait for the node to become idle (60)
#   START_CLUSTER_CRED_EXPIRE  AuthInfo=cred_expire (s) written to slurm.conf;
#                              this is also the delay before a requeued job may
#                              start again (Slurm default 120; we use 10)
set -euo pipefail

MARKER="# written by tests/slurm/start_cluster.sh"
CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
CONF_DIR="$(dirname "$CONF")"
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
WAIT_S="${START_CLUSTER_WAIT:-60}"
CRED_EXPIRE="${START_CLUSTER_CRED_EXPIRE:-10}"
HOST="$(hostname -s)"
FULLHOST="$(hostname)"
NCPU="$(nproc)"

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "start_cluster: $*" >&2; }

dump_logs() {
    local f
    local n
    for f in /var/log/munge/*.log "$LOG_DIR"/*.log; do
        [ -s "$f" ] || continue
        case "$f" in /var/log/munge/*|*.start.log) n=10 ;; *) n=40 ;; esac
        echo "----- tail -n $n $f -----" >&2
        tail -n "$n" "$f" >&2 || true
    done
}

die() {
    log "ERROR: $*"
    dump_logs
    log "ERROR: $*"
    exit 1
}

# command -v alone also "finds" non-executable files, so check -x as well.
have() { local p; p="$(command -v "$1" 2>/dev/null)" && [ -f "$p" ] && [ -x "$p" ]; }
is_root() { [ "$(id -u)" -eq 0 ]; }
running() { pgrep -x "$1" >/dev/null 2>&1; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# State of our node as printed by sinfo (e.g. "idle", "down*", "drained").
node_state() {
    local out
    out="$(sinfo -h -N -o '%N %T' 2>/dev/null || true)"
    if printf '%s\n' "$out" | grep -q "^$HOST "; then
        printf '%s\n' "$out" | awk -v h="$HOST" '$1 == h { print $2; exit }'
    else
        printf '%s\n' "$out" | awk 'NF { print $2; exit }'
    fi
}
node_name() {
    local out
    out="$(sinfo -h -N -o '%N' 2>/dev/null || true)"
    if printf '%s\n' "$out" | grep -qx "$HOST"; then echo "$HOST"; else printf '%s\n' "$out" | awk 'NF { print; exit }'; fi
}

# ---------------------------------------------------------------- 1. install
need_install=0
for b in slurmctld slurmd sbatch srun sinfo scontrol munged munge unmunge; do
    have "$b" || need_install=1
done
if [ "$need_install" = 1 ]; then
    if ! is_root; then
        echo "start_cluster: slurm/munge not installed and not running as root; cannot install" >&2
        exit 3
    fi
    if ! have apt-get; then
        echo "start_cluster: slurm/munge not installed and apt-get is unavailable" >&2
        exit 3
    fi
    log "installing slurm-wlm and munge via apt-get"
    if ! { apt-get update -q >/tmp/start_cluster.apt.log 2>&1 &&
           apt-get install -y -q slurm-wlm munge >>/tmp/start_cluster.apt.log 2>&1; }; then
        echo "start_cluster: apt-get install slurm-wlm munge failed (see /tmp/start_cluster.apt.log)" >&2
        exit 3
    fi
    for b in slurmctld slurmd sbatch srun sinfo scontrol munged munge unmunge; do
        if ! have "$b"; then
            echo "start_cluster: $b still missing after apt-get install" >&2
            exit 3
        fi
    done
fi

# ------------------------------------------------------------ 3. slurm.conf
# (Generated before munge/daemons so we can tell whether a restart is needed.)
mem_kb="$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
REALMEM=$(( mem_kb * 8 / 10 / 1024 ))
[ "$REALMEM" -ge 100 ] || REALMEM=100
# Real topology from slurmd -C (so slurmd does not drain the node for a
# socket/core/thread mismatch); fall back to CPUs only.
topo="$(slurmd -C 2>/dev/null | head -n1 |
        grep -o -E '(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' |
        tr '\n' ' ' || true)"
topo="${topo% }"

gen_conf() {
    cat <<EOF
$MARKER
# Single-node test cluster; regenerated on every run (edits will be lost).
ClusterName=test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may run again
# (Slurm default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Run the scheduler often: a requeued job only becomes eligible after its
# BeginTime (now + cred_expire + 1) and is then started by the next periodic
# pass (defaults: bf_interval=30, sched_interval=60 -> up to ~40 s extra).
SchedulerParameters=bf_interval=1,sched_interval=2
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MinJobAge=86400
JobRequeue=1
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$HOST CPUs=$NCPU${topo:+ $topo} RealMemory=$REALMEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

conf_changed=0
foreign_conf=0
if [ -e "$CONF" ] && [ "$(head -n1 "$CONF")" != "$MARKER" ]; then
    foreign_conf=1
    log "note: $CONF was not written by this script; leaving it alone"
else
    new_conf="$(gen_conf)"
    if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
        if ! is_root; then
            echo "start_cluster: need root to write $CONF" >&2
            exit 3
        fi
        mkdir -p "$CONF_DIR"
        printf '%s\n' "$new_conf" >"$CONF.tmp.$$"
        chmod 0644 "$CONF.tmp.$$"
        mv -f "$CONF.tmp.$$" "$CONF"
        conf_changed=1
        log "wrote $CONF"
    fi
fi

# ------------------------------------------------------- fast path: all up
if [ "$conf_changed" = 0 ] && running munged && munge_ok &&
   running slurmctld && running slurmd && ctld_ok; then
    st="$(node_state)"
    case "$st" in
        idle|mixed|allocated|completing)
            if [ "$st" = idle ]; then
                out="$(timeout 60 srun -N1 -n2 hostname 2>&1)" || die "smoke test srun failed: $out"
                [ "$(printf '%s\n' "$out" | grep -cx "$FULLHOST")" -eq 2 ] ||
                    die "smoke test srun printed unexpected output: $out"
            fi
            echo "slurm cluster up: node $(node_name), $NCPU CPUs, partition debug (already running, state $st)"
            exit 0
            ;;
    esac
fi

if ! is_root; then
    echo "start_cluster: slurm cluster is not up and we are not root; cannot start it" >&2
    exit 3
fi

# ----------------------------------------------------------------- 2. munge
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
munge_user=""
if id munge >/dev/null 2>&1; then
    munge_user=munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
fi
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

if ! munge_ok; then
    if running munged; then
        die "munged is running but 'munge -n | unmunge' fails"
    fi
    log "starting munged"
    if [ -n "$munge_user" ] && have runuser; then
        runuser -u munge -- munged </dev/null >>/var/log/munge/munged.start.log 2>&1 ||
            die "munged failed to start"
    elif [ -n "$munge_user" ]; then
        su -s /bin/sh munge -c munged </dev/null >>/var/log/munge/munged.start.log 2>&1 ||
            die "munged failed to start"
    else
        munged --force </dev/null >>/var/log/munge/munged.start.log 2>&1 ||
            die "munged failed to start"
    fi
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.2; done
    munge_ok || die "munged started but 'munge -n | unmunge' fails"
fi

# ---------------------------------------------------------- 4. slurm daemons
mkdir -p "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"

if [ "$conf_changed" = 1 ] && { running slurmctld || running slurmd; }; then
    log "config changed: shutting down running slurm daemons to restart them"
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        running slurmctld || running slurmd || break
        sleep 0.2
    done
    if running slurmctld || running slurmd; then
        die "slurm daemons did not stop after 'scontrol shutdown'"
    fi
fi

if [ "$foreign_conf" = 0 ] && [ -f "$CTLD_SPOOL/clustername" ] &&
   [ "$(cat "$CTLD_SPOOL/clustername")" != test ]; then
    # Stale state from another cluster name makes slurmctld refuse to start.
    rm -f "$CTLD_SPOOL/clustername"
fi

if ! running slurmctld; then
    log "starting slurmctld"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.start.log" 2>&1 || die "slurmctld failed to start"
fi
for _ in $(seq 1 "$((WAIT_S * 2))"); do ctld_ok && break; sleep 0.5; done
ctld_ok || die "slurmctld is not answering 'scontrol ping'"

if ! running slurmd; then
    log "starting slurmd"
    slurmd </dev/null >>"$LOG_DIR/slurmd.start.log" 2>&1 || die "slurmd failed to start"
fi

# ------------------------------------------------------- 5. wait + smoke test
deadline=$(( $(date +%s) + WAIT_S ))
resumed=0
st=""
while :; do
    st="$(node_state)"
    case "$st" in
        idle|mixed|allocated) break ;;
        down*|drain*|fail*)
            if [ "$resumed" -lt 3 ]; then
                log "node state '$st': resuming"
                scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true
                resumed=$((resumed + 1))
            fi
            ;;
    esac
    running slurmd || die "slurmd is not running (node state '$st')"
    [ "$(date +%s)" -lt "$deadline" ] || die "node did not become idle within ${WAIT_S}s (state '$st')"
    sleep 1
done

if [ "$st" = idle ]; then
    out="$(timeout 60 srun -N1 -n2 hostname 2>&1)" || die "smoke test 'srun -N1 -n2 hostname' failed: $out"
    [ "$(printf '%s\n' "$out" | grep -cx "$FULLHOST")" -eq 2 ] ||
        die "smoke test 'srun -N1 -n2 hostname' printed unexpected output: $out"
fi
echo "slurm cluster up: node $(node_name), $NCPU CPUs, partition debug"
