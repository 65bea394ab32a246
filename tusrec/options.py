"""Command-line options that several commands share (``--cluster``, ``--format``, ``--keys``,
``--chunk``): each command module (``tusrec/<room>/command.py``) adds them from here, so that
they read the same in every command.

On the floor: the submission image holds it (./predict's ``--format``); ``tusrec.cluster``
(Dask) is imported only when ``--cluster`` is given.
"""

from __future__ import annotations

import argparse
import math
import sys


def cluster_spec(text: str):
    """argparse type of --cluster (tusrec.cluster is imported only when it is given: the
    submission image has no Dask)."""
    from tusrec.cluster import ClusterError, parse_cluster

    try:
        return parse_cluster(text)
    except ClusterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_cluster_flag(p) -> None:
    p.add_argument(
        "--cluster",
        type=cluster_spec,
        default=None,
        metavar="local:N|tcp://HOST:PORT",
        help="run one unit per scan on Dask: N worker processes here (local:N) or an existing "
        "scheduler's workers (tcp://HOST:PORT) (default: one scan after another in this process)",
    )


def on_cluster(spec, work, gpu_slots: bool = False):
    """work(client) on the cluster of ``spec``; a cluster that cannot be used exits 2."""
    from tusrec import cluster

    try:
        with cluster.connect(spec, gpu_slots) as client:
            return work(client)
    except cluster.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def add_keys_and_chunk(p) -> None:
    add_keys(p)
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=16,
        help="frames read and written at a time, which bounds the memory a scan takes; the "
        "numbers do not depend on it (default: %(default)s)",
    )


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a whole number >= 0 (a seed: numpy's SeedSequence takes no negative)."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 or more")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type of a finite number > 0 (seconds, megabytes: NaN and inf are refused)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number above 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type of a finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 or more")
    return value


def add_keys(p) -> None:
    p.add_argument(
        "--keys", nargs="+", default=None, metavar="KEY", help="only these scan keys (default: every scan)"
    )


def add_format(p) -> None:
    p.add_argument(
        "--format",
        choices=["transforms", "ddf"],
        default="transforms",
        help="'transforms': the compact form, per scan the (N-1, 4, 4) transforms and "
        "GL/LL, kilobytes, scored exactly as the dense DDFs they stand for; 'ddf': dense GP/LP "
        "as well, the challenge's official form (1.1 GB a 150-frame scan, 12 GB at 1,600) "
        "(default: %(default)s)",
    )
