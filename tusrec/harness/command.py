"""``./evaluate run``: its options; what it runs is tusrec.harness.runner.run_command.

A new ``./evaluate`` subcommand of this room: its ``add_<name>(parser)`` here and one line
in ``tusrec.cli.EVALUATE`` (its name, this module, the function and the one-line summary:
the dispatcher imports only the module of the command that runs)."""

from __future__ import annotations

from pathlib import Path

from tusrec.options import add_cluster_flag


def add_run(run) -> None:
    run.description = (
        "The organisers' runner. For each scan of DATA (with ground truth) and each "
        "team image, through the Docker API (DOCKER_HOST is honoured): mount only that scan's "
        "frames, landmarks and calibration read-only at /input and an empty /output; no network, "
        "no added privileges, a memory limit, GPUs with --gpus; kill at --time-limit (status "
        "timeout); a non-zero exit is failed, unscorable output invalid or missing, /output over its "
        "quota invalid. Each scan is "
        "scored at once and its predictions deleted. Writes OUT/<team>/metrics.csv and "
        "metrics.h5 (as `evaluate score`), container logs in OUT/<team>/logs/, and ranks the "
        "teams into OUT/ranking/. A rerun skips scans already judged."
    )
    run.add_argument(
        "--team",
        action="append",
        required=True,
        metavar="NAME=IMAGE",
        help="a team's image (loaded in the engine: docker load -i team.tar); repeat for every team",
    )
    run.add_argument("--data", type=Path, required=True, help="test/validation folder with ground truth")
    run.add_argument("--out", type=Path, required=True, help="folder for the teams' tables, logs, ranking")
    run.add_argument("--time-limit", type=float, default=120.0, help="seconds per scan (default 120)")
    run.add_argument("--memory", default="16g", help="memory limit per container (default 16g)")
    run.add_argument("--gpus", default=None, help="'all', a count or device=0,1 (default: no GPU)")
    run.add_argument("--user", default=None, help="run containers as UID:GID (default: the image's user)")
    run.add_argument(
        "--output-quota-margin",
        type=float,
        default=64.0,
        metavar="MB",
        help="/output may hold the scan's dense predictions (+5%%) plus this many MB; beyond it the "
        "container is killed and the scan is invalid (default 64)",
    )
    run.add_argument(
        "--tmp-size",
        default="1g",
        help="size of each tmpfs a container may write besides /output (/tmp, /var/tmp, /run, "
        "/dev/shm, the image's VOLUMEs; the root filesystem is read-only; counted against "
        "--memory) (default 1g)",
    )
    run.add_argument(
        "--userns",
        default="auto",
        help="podman's user namespace mode for each container: 'auto' maps container root to an "
        "unprivileged host range (needs a 'containers' entry in /etc/subuid and /etc/subgid); "
        "'host' turns it off. Docker ignores it (its userns-remap is daemon-wide) (default %(default)s)",
    )
    run.add_argument(
        "--output-fs",
        choices=["auto", "kernel", "walk"],
        default="auto",
        help="'kernel': each container's /output is a loop-mounted ext4 filesystem of its quota's "
        "size (needs root, mount and mkfs.ext4); 'walk': a plain folder walked every 0.5 s; "
        "'auto': kernel where the host allows, else walk, said at the start (default %(default)s)",
    )
    run.add_argument(
        "--judge-workers",
        type=int,
        default=2,
        metavar="N",
        help="scans judged at once while the next containers run, each in its own bounded "
        "scoring worker (the disk then holds up to N + 1 outputs) (default %(default)s)",
    )
    run.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    run.add_argument(
        "--keep-predictions",
        action="store_true",
        help="keep a copy of each team's ok files in OUT/<team>/predictions (regular files of the "
        "runner's user, mode 0644; refused for a root image when container root is host root)",
    )
    run.add_argument("--no-rank", action="store_true", help="only run and score; no ranking report")
    run.add_argument("--normalisation", choices=["minmax", "identity"], default=None, help="as for rank")
    run.add_argument("--bootstrap", type=int, default=2000, help="resamples per level (default 2000)")
    run.add_argument("--title", default=None, help="report title")
    run.add_argument("--synthetic", action="store_true", help="label the report SYNTHETIC DATA")
    add_cluster_flag(run)
    run.set_defaults(run=run_evaluate_run)


def run_evaluate_run(args) -> int:
    from tusrec.harness.runner import run_command

    return run_command(args)
