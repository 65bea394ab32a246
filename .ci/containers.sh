#!/usr/bin/env bash
# Set up the container engine the container tests use (tests/test_containers.py):
# podman from Debian's packages (it speaks the Docker API, so the runner's docker SDK
# drives it), the settings podman needs on these machines, and a local Debian base image
# that stands in for the CUDA runtime image no registry here can serve. Idempotent: what
# exists is kept (the base image takes a minute or two to make, once).
# Prints the containers.conf path on its last line; tests read it from CONTAINERS_CONF.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${TUSREC_TEST_BASE_IMAGE:-localhost/debian-base:bookworm}"
CONF="${CONTAINERS_CONF:-$PWD/build/containers.conf}"

missing=()
for tool in podman runc debootstrap docker-compose; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "containers: installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq --no-install-recommends podman runc debootstrap docker-compose >/dev/null
fi

# The runner gives each team container its own user namespace (podman's --userns=auto),
# which takes its ids from the 'containers' entries of /etc/subuid and /etc/subgid.
for map in /etc/subuid /etc/subgid; do
    grep -q '^containers:' "$map" 2>/dev/null || echo "containers:2147483647:2147483648" >>"$map"
done

# podman's defaults fail here: crun cannot set RLIMIT_NOFILE, and cgroups are in hybrid
# mode; runc with cgroupfs and no default ulimits works.
mkdir -p "$(dirname "$CONF")"
cat >"$CONF" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF="$CONF"

if ! podman image exists "$BASE_IMAGE"; then
    echo "containers: making $BASE_IMAGE with debootstrap (once; a minute or two)" >&2
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi

echo "$CONF"
