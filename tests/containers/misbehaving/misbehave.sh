#!/bin/bash
# What each misbehaving team image does (its mode is written into the image).
set -u
MODE="$(cat /opt/team/mode)"
keys() {  # the scan keys of /input, from the val/test layout's frames/<sub>/<scan>.h5
    for f in /input/frames/*/*.h5; do
        sub="$(basename "$(dirname "$f")")"
        echo "sub${sub}__$(basename "$f" .h5)"
    done
}
case "$MODE" in
sleep)
    echo "sleeping past any time limit"
    sleep 3600
    ;;
crash)
    echo "Traceback (most recent call last): RuntimeError: this team's model crashed" >&2
    exit 3
    ;;
wrong-shape)
    for key in $(keys); do cp /opt/team/wrong_shape.h5 "/output/${key}.h5"; done
    echo "wrote predictions of the wrong shape"
    ;;
network)
    echo "interfaces: $(ls /sys/class/net | tr '\n' ' ')"
    if (exec 3<>/dev/tcp/deb.debian.org/80) 2>/tmp/err; then
        echo "NETWORK REACHED"
        exit 0
    fi
    echo "network unreachable: $(tr '\n' ' ' </tmp/err)"
    exit 4
    ;;
snoop)
    # Everything a curious team could look at: files named like the ground truth, and any
    # HDF5 file holding a 'tforms' dataset (its name is stored in the file).
    found=$(find / \( -path /proc -o -path /sys \) -prune -o \
        \( -name 'transfs' -o -name 'frames_transfs' -o -name '*tforms*' \) -print 2>/dev/null)
    for f in $(find / \( -path /proc -o -path /sys \) -prune -o -name '*.h5' -print 2>/dev/null); do
        echo "saw $f"
        if grep -q tforms "$f"; then found="$found $f"; fi
    done
    echo "mounts: $(grep -E ' /(input|output) ' /proc/self/mountinfo | awk '{print $5, $6}' | tr '\n' ';')"
    if [ -n "$found" ]; then
        echo "GROUND TRUTH FOUND: $found"
        exit 0
    fi
    echo "ground truth not found"
    exit 5
    ;;
*)
    echo "unknown MODE $MODE" >&2
    exit 64
    ;;
esac
