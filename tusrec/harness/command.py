"""``./evaluate run``: its options; what it runs is tusrec.harness.runner.run_command.

A new ``./evaluate`` subcommand of this room: its ``add_<name>(parser)`` here and one line
in ``tusrec.cli.EVALUATE`` (its name, this module, the function and the one-line summary:
the dispatcher imports only the module of the command that runs)."""

from __future__ import annotations

from pathlib import Path

from tusrec.options import add_cluster_flag, add_keys, non_negative_float, positive_float, positive_int


def add_container_limits(p) -> None:
    """The limits a team's container runs under: ``./evaluate run``'s, which preflight takes
    too (tusrec.harness.runner.limits_from reads them)."""
    p.add_argument(
        "--time-limit",
        type=positive_float,
        default=120.0,
        help="seconds a container may run on one scan, from start to exit (default: %(default)s)",
    )
    p.add_argument(
        "--memory",
        default="16g",
        help="memory limit per container, in the engine's units (512m, 16g) (default: %(default)s)",
    )
    p.add_argument("--gpus", default=None, help="'all', a count or device=0,1 (default: no GPU)")
    p.add_argument("--user", default=None, help="run containers as UID:GID (default: the image's user)")
    p.add_argument(
        "--output-quota-margin",
        type=non_negative_float,
        default=64.0,
        metavar="MB",
        help="/output may hold the scan's largest valid predictions file plus this many MB; beyond it "
        "the container is killed and the scan is invalid (default: %(default)s)",
    )
    p.add_argument(
        "--tmp-size",
        default="1g",
        help="size of each tmpfs a container may write besides /output (/tmp, /var/tmp, /run, "
        "/dev/shm, the image's VOLUMEs; the root filesystem is read-only; counted against "
        "--memory) (default: %(default)s)",
    )
    p.add_argument(
        "--userns",
        default="auto",
        help="podman's user namespace mode for each container: 'auto' maps container root to an "
        "unprivileged host range (needs a 'containers' entry in /etc/subuid and /etc/subgid); "
        "'host' turns it off. Docker ignores it (its userns-remap is daemon-wide) (default %(default)s)",
    )
    p.add_argument(
        "--output-fs",
        choices=["auto", "kernel", "walk"],
        default="auto",
        help="'kernel': each container's /output is a loop-mounted ext4 filesystem of its quota's "
        "size (needs root, mount and mkfs.ext4); 'walk': a plain folder walked every 0.5 s; "
        "'auto': kernel where the host allows, else walk, said at the start (default %(default)s)",
    )


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
    add_container_limits(run)
    run.add_argument(
        "--judge-workers",
        type=positive_int,
        default=2,
        metavar="N",
        help="scans judged at once while the next containers run, each in its own bounded "
        "scoring worker (the disk then holds up to N + 1 outputs) (default %(default)s)",
    )
    add_keys(run)
    run.add_argument(
        "--keep-predictions",
        action="store_true",
        help="keep a copy of each team's ok files in OUT/<team>/predictions (regular files of the "
        "runner's user, mode 0644; refused for a root image when container root is host root)",
    )
    run.add_argument("--no-rank", action="store_true", help="only run and score; no ranking report")
    run.add_argument(
        "--normalisation",
        choices=["minmax", "identity"],
        default=None,
        help="minmax (2024) or identity (2025), as for rank (default: identity if every scan is a 2025 scan)",
    )
    run.add_argument(
        "--bootstrap",
        type=positive_int,
        default=2000,
        help="the ranking's bootstrap resamples at each level, scans and subjects (default: %(default)s)",
    )
    run.add_argument("--title", default=None, help="report title (default: 'TUS-REC ranking')")
    run.add_argument("--synthetic", action="store_true", help="label the report SYNTHETIC DATA")
    add_cluster_flag(run)
    run.set_defaults(run=run_evaluate_run)


def run_evaluate_run(args) -> int:
    from tusrec.harness.runner import run_command

    return run_command(args)


# ---------------------------------------------------------------------- the participant's side


def add_preflight(p) -> None:
    p.description = (
        "Test a submission image as the organisers will run it, in one command: `./evaluate run`'s "
        "own runner (the same staging, limits, quota, isolation and judging) on the longest and the "
        "shortest scan of DATA (--keys to choose, --all for every scan), then a checklist, each line "
        "pass, FAIL with the reason, or not checked: starts and exits 0, writes the official dense "
        "form, every file valid, within the time limit on the longest scan (with the margin), image "
        "size, runs as non-root, needs no network, finds the GPU (with --gpus). Exit status 0 only "
        "when no line fails (the image would be judged); --save then writes the tar to hand in."
    )
    p.add_argument("image", help="the image, as the engine names it (docker build -t NAME DIR)")
    p.add_argument("--data", type=Path, required=True, help="validation folder with ground truth (transfs/)")
    add_keys(p)
    p.add_argument(
        "--all", action="store_true", help="every scan of DATA (default: the longest and the shortest)"
    )
    add_container_limits(p)
    p.add_argument(
        "--max-image-gb",
        type=float,
        default=16.0,
        metavar="GB",
        help="the image-size line fails above this (no limit is published; large images are slow to "
        "hand in and load) (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a new or empty folder to keep the run's table and the container's logs in "
        "(default: a temporary folder, removed)",
    )
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="FILE.tar",
        help="when no line fails, save the image there (docker save): the file to hand in",
    )
    p.set_defaults(run=run_preflight)


def run_preflight(args) -> int:
    from tusrec.harness.preflight import preflight_command

    return preflight_command(args)


def add_new_submission(p) -> None:
    p.description = (
        "Write a team's submission folder DIR (new, or empty): the model (an example by phase "
        "correlation, or --model FILE.py:NAME copied in), a Dockerfile on the CUDA runtime base that "
        "installs the kit's predictor from its wheel (wheels/, with the [predict] libraries only) "
        "and runs `predict --model`, requirements.txt for the model's own libraries, weights/, and "
        "a README with the loop: build, preflight, save."
    )
    p.add_argument("dir", type=Path, help="the folder to write (refused if it holds anything)")
    p.add_argument(
        "--model",
        default=None,
        metavar="FILE.py:NAME",
        help="your model's file and the function or class in it (./predict --model's kinds), copied "
        "into DIR (default: the example model.py:transforms)",
    )
    p.add_argument(
        "--wheel",
        type=Path,
        default=None,
        help="the kit's wheel to install in the image (default: built from this checkout, as make wheel)",
    )
    p.set_defaults(run=run_new_submission)


def run_new_submission(args) -> int:
    import sys

    from tusrec.harness.starter import StarterError, image_tag, new_submission

    try:
        written = new_submission(args.dir, args.model, args.wheel)
    except StarterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tag = image_tag(args.dir)
    print(f"wrote {len(written)} files into {args.dir}: {', '.join(map(str, written))}")
    print(
        f"next: docker build -t {tag} {args.dir}, then ./evaluate preflight {tag} --data VAL --save {tag}.tar"
    )
    return 0
