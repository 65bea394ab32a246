#!/bin/bash
# Slurm epilog for the README's Slurm recipe: remove the team containers that a tusrec worker
# of the job that just ended left running. Podman places a container outside the job's
# cgroups, so when Slurm cancels the job (scancel, walltime, preemption) it kills the worker,
# its watchdog and its podman service, but not the container: without this, the container
# runs on, unwatched (no time limit), on a GPU that Slurm gives to the next job. The worker
# labels each container it starts with its job id (tusrec.slurm.job, tusrec/cluster.py).
#
# Install on every node as the Epilog of slurm.conf (scripts/slurm-one-node.sh does it for
# its test cluster). Slurm runs it as root with SLURM_JOB_ID and SLURM_JOB_USER set; the
# containers are in the job user's podman storage. It always exits 0: an epilog that fails
# drains the node.
set -u
job="${SLURM_JOB_ID:-}"
user="${SLURM_JOB_USER:-root}"
[ -n "$job" ] && command -v podman >/dev/null 2>&1 || exit 0
as=()
if [ "$user" != root ]; then
    # rootless podman: the user's storage and runtime folder (not tried on the test cluster,
    # whose jobs run as root)
    uid="$(id -u "$user" 2>/dev/null)" || exit 0
    as=(runuser -u "$user" -- env XDG_RUNTIME_DIR="/run/user/$uid")
fi
ids="$(timeout 60 "${as[@]}" podman ps -aq --filter "label=tusrec.slurm.job=$job" 2>/dev/null)"
if [ -n "$ids" ]; then
    # shellcheck disable=SC2086  # one id a word; -t 0: killed at once, it is past its job
    timeout 120 "${as[@]}" podman rm -f -v -t 0 $ids >/dev/null 2>&1
    logger -t tusrec-epilog "job $job: removed containers $(echo $ids | tr '\n' ' ')" 2>/dev/null
fi
exit 0
