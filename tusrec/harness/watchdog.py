"""The runner's watchdog: no team container outlives its deadline or the runner.

Started by ``tusrec.harness.runner`` at the beginning of a run, in its own session (so a
signal to the runner's process group does not reach it), with its standard input a pipe
whose only writer is the runner. The runner writes one line per container::

    start <container id> <deadline, unix seconds>
    end <container id>

The watchdog kills (and removes, with its anonymous volumes) a container whose deadline has
passed, and when the pipe reaches end of file -- the runner finished, crashed or was
SIGKILLed: the kernel closes its end in every case -- it kills and removes every container
carrying the run's label ``tusrec.runner=<tag>`` and exits. It acts on nothing else.

    python -m tusrec.harness.watchdog TAG [LABEL]
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

DEFAULT_LABEL = "tusrec.run"


def _remove(client, container_id: str) -> None:
    import docker

    try:
        container = client.containers.get(container_id)
    except docker.errors.DockerException:
        return
    for action in (container.kill, lambda: container.remove(force=True, v=True)):
        with contextlib.suppress(docker.errors.DockerException):
            action()


def remove_labelled(client, label: str, tag: str) -> list[str]:
    """Kill and remove every container labelled ``label=tag``; returns their ids."""
    import docker

    try:
        # sparse: ids from the list call alone (a full list inspects each container and fails
        # on one that is being removed meanwhile).
        found = client.containers.list(all=True, filters={"label": f"{label}={tag}"}, sparse=True)
    except docker.errors.DockerException:
        return []
    for container in found:
        _remove(client, container.id)
    return [c.id for c in found]


def watch(tag: str, label: str = DEFAULT_LABEL, stream=None) -> None:
    import docker

    stream = stream if stream is not None else sys.stdin.buffer
    fd = stream.fileno()
    client = docker.from_env()
    deadlines: dict[str, float] = {}
    pending = b""
    while True:
        now = time.time()
        for container_id, deadline in list(deadlines.items()):
            if now >= deadline:
                _remove(client, container_id)
                del deadlines[container_id]
        wait = min((d - now for d in deadlines.values()), default=60.0)
        ready, _, _ = select.select([fd], [], [], max(0.05, min(wait, 60.0)))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # the runner is gone (or done): nothing of its run may stay
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[0] == "start":
                deadlines[parts[1]] = float(parts[2])
            elif len(parts) == 2 and parts[0] == "end":
                deadlines.pop(parts[1], None)
    # Twice: a create the runner had sent just before it died may land after the first list.
    for attempt in range(2):
        remove_labelled(client, label, tag)
        if attempt == 0:
            time.sleep(2.0)
    client.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    # Ctrl-C and a terminal hang-up are meant for the runner; this process cleans up after it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    watch(argv[0], argv[1] if len(argv) == 2 else DEFAULT_LABEL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
