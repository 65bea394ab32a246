#!/usr/bin/env bash
# A one-node Slurm on this machine, from Debian's packages, for the Slurm recipe's real run
# (tests/test_slurm.py, `make test-slurm`). As root, without systemd:
#
#   scripts/slurm-one-node.sh up      # install if missing, configure, start, wait for an idle node
#   scripts/slurm-one-node.sh down    # cancel its jobs, stop slurmctld, slurmd and munged
#   scripts/slurm-one-node.sh status  # sinfo, or why not
#
# Idempotent: what is installed, configured or running is kept. The node is this machine
# (`hostname`), with its CPUs and memory as `slurmd -C` finds them, in one partition
# ("tusrec", the default one); jobs run in cgroups (v1) where its controllers are mounted,
# and end with the recipe's epilog (scripts/slurm-epilog.sh). It declares 2 GPUs as GRES
# that are NOT GPUs: /dev/null and /dev/zero stand in for /dev/nvidia0 and /dev/nvidia1, so
# that Slurm allocates and numbers them as it does real ones (SLURM_JOB_GPUS,
# CUDA_VISIBLE_DEVICES) and the recipe's `--gres=gpu:1` jobs run unchanged; nothing can
# compute on them. No accounting database: a test cluster, not a site's. Each step prints
# its time in seconds. A slurm.conf (or gres.conf, cgroup.conf, epilog) that this script did
# not write is left alone: it stops instead.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by tusrec scripts/slurm-one-node.sh"
CLUSTER=tusrec-test
PARTITION=tusrec
LOG_DIR=/var/log/slurm
CHANGED=0 # set by put when a settings file changed
EPILOG="$CONF_DIR/tusrec-epilog.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

now() { date +%s.%N; }
step() { # step NAME COMMAND...: run it, print how long it took
    local name="$1" t0 t1
    shift
    t0=$(now)
    "$@"
    t1=$(now)
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "slurm-one-node: %-10s %6.1f s\n", n, b - a }'
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "slurm-one-node: needs root (it installs packages and starts the daemons)" >&2
        exit 3
    fi
}

install_packages() {
    local missing=()
    for tool in munged slurmctld slurmd sbatch; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "slurm-one-node: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})" >&2
        apt-get update -qq
        # invoke-rc.d's policy may refuse to start the services: this script starts them.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    fi
}

put() { # put FILE: write stdin to FILE (atomically) unless it holds that already; refuse a
    # file this script did not write (a site's own configuration is left alone)
    local file="$1" tmp="$1.tmp.$$"
    if [ -f "$file" ] && ! grep -qxF "$MARK" "$file"; then
        echo "slurm-one-node: $file exists and is not this script's: left alone, not starting" >&2
        exit 4
    fi
    { echo "$MARK"; cat; } >"$tmp"
    if cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$file"
        CHANGED=1
    fi
}

configure() {
    local file
    for file in "$CONF" "$CONF_DIR/gres.conf" "$CONF_DIR/cgroup.conf" "$EPILOG"; do
        # all checked before any is written
        if [ -f "$file" ] && ! grep -qxF "$MARK" "$file"; then
            echo "slurm-one-node: $file exists and is not this script's: left alone, not starting" >&2
            exit 4
        fi
    done
    install -d -o munge -g munge -m 0700 /etc/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
    local host node proctrack=proctrack/linuxproc task=task/none
    host="$(hostname -s)"
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node="$(slurmd -C | head -n 1)"
    if [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/freezer ] && [ -d /sys/fs/cgroup/cpuset ]; then
        # cgroup v1 controllers (as here): each job in its own cgroups, as on a site's cluster
        # (its cores and memory constrained; processes tracked and killed by cgroup). Devices
        # are not constrained: the stand-in GPUs are /dev/null and /dev/zero.
        proctrack=proctrack/cgroup
        task=task/cgroup
        put "$CONF_DIR/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainDevices=no
EOF
    else
        # cgroup v2 without systemd is not what Slurm 22.05 supports well: processes are
        # tracked by parent id instead, and nothing is constrained.
        echo "slurm-one-node: no cgroup v1 controllers: jobs without cgroups (proctrack/linuxproc)" >&2
    fi
    # The recipe's epilog (scripts/slurm-epilog.sh), with the podman settings of this machine
    # (CONTAINERS_CONF at `up`; make test-slurm passes .ci/containers.sh's).
    {
        echo "#!/bin/bash"
        echo "$MARK"
        [ -z "${CONTAINERS_CONF:-}" ] || echo "export CONTAINERS_CONF=$(printf %q "$CONTAINERS_CONF")"
        tail -n +2 "$HERE/slurm-epilog.sh"
    } >"$EPILOG.tmp.$$"
    chmod 0755 "$EPILOG.tmp.$$"
    if cmp -s "$EPILOG.tmp.$$" "$EPILOG"; then rm -f "$EPILOG.tmp.$$"; else mv "$EPILOG.tmp.$$" "$EPILOG"; fi
    put "$CONF" <<EOF
# A one-node test cluster; its two GPUs are stand-ins (see gres.conf).
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=$proctrack
TaskPlugin=$task
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
Epilog=$EPILOG
$node Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    put "$CONF_DIR/gres.conf" <<EOF
# Not GPUs: two character devices that exist everywhere, so that Slurm allocates and numbers
# "gpu" GRES (SLURM_JOB_GPUS=0 or 1) as it would /dev/nvidia0 and /dev/nvidia1.
AutoDetect=off
Name=gpu File=/dev/null
Name=gpu File=/dev/zero
EOF
}

running() { # running PID: the process runs (a zombie does not: PID 1 here may reap late)
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

alive() { # alive PIDFILE: the process it names runs
    [ -s "$1" ] && running "$(cat "$1")"
}

start_munge() {
    if ! alive /run/munge/munged.pid; then
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
    fi
    munge -n | unmunge >/dev/null
}

start_slurm() {
    if [ "$CHANGED" = 1 ]; then # new settings (plugins): the daemons start again to read them
        stop_daemon /run/slurmd.pid
        stop_daemon /run/slurmctld.pid
    fi
    alive /run/slurmctld.pid || /usr/sbin/slurmctld
    alive /run/slurmd.pid || /usr/sbin/slurmd
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(sinfo -h -N -p "$PARTITION" -o %t 2>/dev/null | head -n 1 || true)"
        case "$state" in
            idle | mix | alloc) return 0 ;;
            down* | drain* | inval*)
                # ReturnToService=2 brings a node that registers with a valid config back;
                # one marked down by an earlier run of a different config needs a resume.
                scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "slurm-one-node: node not idle after 60 s (state '$state'); see $LOG_DIR/slurm{ctld,d}.log" >&2
    sinfo -N -l >&2 || true
    exit 5
}

up() {
    need_root
    step install install_packages
    step configure configure
    step munged start_munge
    step daemons start_slurm
    step idle wait_idle
    sinfo -N -o '%N %P %t %c %m %G'
}

stop_daemon() { # stop_daemon PIDFILE: SIGTERM to the daemon it names, and wait (10 s at most)
    local pid
    if alive "$1"; then
        pid="$(cat "$1")"
        kill "$pid"
        for _ in $(seq 100); do
            running "$pid" || break
            sleep 0.1
        done
        echo "slurm-one-node: stopped $(basename "$1" .pid) (pid $pid)"
    fi
}

down() {
    need_root
    if alive /run/slurmctld.pid; then
        # Jobs first (a worker left running keeps its podman service); then the daemons.
        scancel --partition="$PARTITION" 2>/dev/null || true
        for _ in $(seq 60); do
            [ -z "$(squeue -h -p "$PARTITION" -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    local pidfile
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        stop_daemon "$pidfile"
    done
}

status() {
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "slurm-one-node: not installed"
        return 1
    fi
    sinfo -N -o '%N %P %t %c %m %G'
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
