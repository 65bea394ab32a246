#!/bin/bash
# What each misbehaving team image does (its mode and payload are written into the image).
set -u
MODE="$(cat /opt/team/mode)"
keys() {  # the scan keys of /input, from the val/test layout's frames/<sub>/<scan>.h5
    for f in /input/frames/*/*.h5; do
        sub="$(basename "$(dirname "$f")")"
        echo "sub${sub}__$(basename "$f" .h5)"
    done
}
copy_payload() {  # the payload's file of each staged scan, and its manifest if any
    for key in $(keys); do cp --no-preserve=all "/opt/team/payload/${key}.h5" /output/; done
    if [ -f /opt/team/payload/predictions.csv ]; then
        cp --no-preserve=all /opt/team/payload/predictions.csv /output/
    fi
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
copy)
    # Files the test made on the host and baked into the image: a valid prediction, or
    # one crafted against the host (links into another team's kept file, virtual
    # datasets, external storage, a chunk-layout bomb, malformed attributes, a manifest).
    copy_payload
    echo "copied: $(ls /output | tr '\n' ' ')"
    ;;
slow-copy)
    sleep 4
    copy_payload
    echo "copied after a while"
    ;;
quota)
    for key in $(keys); do head -c 4G /dev/zero >"/output/${key}.h5"; done
    echo "wrote 4 GB per scan"
    sleep 30 # its own filesystem stops the write at once: be there when the watcher looks
    ;;
sparse)
    # 1 TB that costs no disk: whoever reads it pays.
    for key in $(keys); do truncate -s 1T "/output/${key}.h5"; done
    sleep 30
    ;;
tree)
    # 20,000 levels, 1,000 at a time (each step's path stays under PATH_MAX; deeper than
    # any path the host could name).
    cd /output || exit 1
    step="$(printf 'd/%.0s' $(seq 1000))"
    for i in $(seq 20); do mkdir -p "$step" && cd "$step" || break; done
    echo "made a folder tree $((i * 1000)) deep"
    ;;
links)
    # Every kind of entry an unprivileged team can make, aimed at the host.
    for key in $(keys); do ln -s /etc/shadow "/output/${key}.h5"; done
    mkfifo /output/predictions.csv
    ln -s / /output/root
    ln -s /output/loop /output/loop
    mkfifo "/output/$(printf 'odd\377\001name\n')"
    touch "/output/$(printf '\342\200\256evil')"
    echo "made links and fifos"
    ;;
log)
    head -c 100M /dev/zero | tr '\0' x | fold -w 1000
    echo "LAST LINE OF A HUGE LOG"
    ;;
big-manifest)
    copy_payload
    # Over the runner's 1 MB read cap, within the output quota.
    head -c 2M /dev/urandom >/output/predictions.csv
    echo "wrote a 2 MB manifest"
    ;;
setuid)
    # Run as root: the payload's valid HDF5 file behind an ELF user block, made setuid root.
    copy_payload
    for key in $(keys); do chown 0:0 "/output/${key}.h5" && chmod 4755 "/output/${key}.h5"; done
    echo "planted: $(ls -ln /output | tr '\n' ' ')"
    ;;
unlinked)
    # Invisible to any walk over names: a file unlinked while open, written without end.
    exec 3>/output/hidden
    rm /output/hidden
    head -c 4G /dev/zero >&3
    echo "wrote into an unlinked file until: $?"
    sleep 60
    ;;
longnames)
    # Folders of 255-character names, deeper than the host's PATH_MAX, then 2 GB of files.
    cd /output || exit 1
    name="$(printf 'n%.0s' $(seq 255))"
    for i in $(seq 20); do mkdir "$name" && cd "$name" || break; done
    for i in $(seq 2000); do head -c 1M /dev/zero >"f$i" || break; done
    echo "wrote $i files below a path of 20 x 256 characters"
    sleep 60
    ;;
fill)
    # As much as the disk takes, then hold on.
    for key in $(keys); do head -c 4G /dev/zero >"/output/${key}.h5"; done
    echo "filled what it could"
    sleep 60
    ;;
*)
    echo "unknown MODE $MODE" >&2
    exit 64
    ;;
esac
