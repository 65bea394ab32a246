"""Run a stage's units on Dask distributed: ``--cluster`` of ``./landmarks``,
``./evaluate score``, ``./evaluate run`` and ``tusrec simulate``.

- omitted: the in-process path (this module is not imported);
- ``local:N``: a ``distributed.LocalCluster`` of N worker processes (one thread each) on
  this machine; for ``run`` each worker holds one ``GPU`` slot;
- ``tcp://HOST:PORT``: an existing Dask scheduler, whose workers were started by the
  organisers (README, "Evaluating on a cluster").

A *unit* is one scan's landmarks (``tusrec.landmarks``), one simulated scan
(``tusrec.simulate.dataset``), one (team, scan) scoring (``tusrec.scoring``) or one
(team, scan) container run (``tusrec.harness.cluster``): each stage defines its units
and calls ``map_units`` here. Units are Dask futures; nothing here queues, schedules or
retries by itself: Dask's scheduler places them, its ``resources`` send container runs only
to workers holding ``GPU=1``, its ``retries`` redo a unit that raised, and a unit whose
worker died is rescheduled by Dask on another worker
(``distributed.scheduler.allowed-failures``).

Files: a unit never writes a table. Units write their per-scan files (scoring cache,
logs, kept predictions, simulated scans) under a temporary name renamed into place
(``tusrec.data.atomic_path``), into the folder that the client and every worker see at
the same path (shared storage). The client merges the results it receives into the
tables and landmark files exactly as the in-process path does, in the same order, so the
files are the same. A unit that was killed half-way leaves at most a temporary file or a
work folder, which nothing reads; its redo starts from nothing.

This module is the floor of every stage that uses it: it imports none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tqdm import tqdm

LOCAL = "local"
REMOTE = "tcp"
GPU = "GPU"  # the Dask resource a worker holds per GPU (or per container slot on a CPU node)
WORKER_GPUS_ENV = "TUSREC_WORKER_GPUS"  # device ids of the worker's own GPU(s), e.g. "2"
SLURM_JOB_LABEL = "tusrec.slurm.job"  # on a container a Slurm job's worker started: the job id
UNIT_RETRIES = 2  # Dask retries of a unit that raised (an engine or file-system hiccup)
_LOCAL_SPEC = re.compile(r"^local:(\d+)$")
_TCP_SPEC = re.compile(r"^tcp://[^\s/:]+:\d+$")


class ClusterError(RuntimeError):
    """The cluster cannot be used (a bad --cluster, no worker, units that could not run):
    every command reports it as one line and exits 2."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``--cluster`` asked for: ``local`` with ``workers``, or a scheduler ``address``."""

    kind: str
    workers: int = 0
    address: str = ""


def parse_cluster(text: str | None) -> ClusterSpec | None:
    """``None`` -> None (in process); ``'local:N'`` -> N local workers;
    ``'tcp://HOST:PORT'`` -> that scheduler. Anything else raises ClusterError."""
    if text is None:
        return None
    m = _LOCAL_SPEC.fullmatch(text.strip())
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 1024:
            raise ClusterError(f"--cluster {text!r}: local:N needs 1 <= N <= 1024")
        return ClusterSpec(LOCAL, workers=n)
    if _TCP_SPEC.fullmatch(text.strip()):
        return ClusterSpec(REMOTE, address=text.strip())
    raise ClusterError(f"--cluster {text!r}: expected local:N (e.g. local:4) or tcp://HOST:PORT")


@contextlib.contextmanager
def connect(spec: ClusterSpec, gpu_slots: bool = False, log=print):
    """A ``distributed.Client`` on ``spec``; a local cluster is made and closed here.

    gpu_slots: each local worker holds ``GPU=1`` (container units need one). Prints the
    dashboard address when there is one.
    """
    from distributed import Client

    cluster = None
    if spec.kind == LOCAL:
        cluster = local_cluster(spec.workers, gpu_slots)
        client = Client(cluster)
    else:
        try:
            client = Client(spec.address, timeout="30s")
        except OSError as err:
            raise ClusterError(f"no Dask scheduler at {spec.address} ({err})") from None
    try:
        link = dashboard_link(client)
        where = f"local cluster of {spec.workers} workers" if cluster else f"scheduler {spec.address}"
        log(f"dask: {where}" + (f", dashboard {link}" if link else " (no dashboard)"), flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def local_cluster(workers: int, gpu_slots: bool = False):
    """The LocalCluster of ``--cluster local:N``: N worker processes of one thread each
    (a worker is a slot), each holding ``GPU=1`` with ``gpu_slots``."""
    import dask
    from distributed import LocalCluster

    # As configs/dask/tusrec.yaml, which the recipes' workers read through DASK_CONFIG.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # a free port: other runs may hold 8787
        resources={GPU: 1} if gpu_slots else None,
        silence_logs=logging.ERROR,
    )


def dashboard_link(client) -> str:
    """The scheduler's dashboard address, or '' when it serves none (no bokeh there)."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:
        return ""
    return client.dashboard_link if "dashboard" in services else ""


def worker_gpus(requested: str | None, environ: dict | None = None) -> str | None:
    """The ``--gpus`` a container gets on this worker: its own device only.

    requested: the run's --gpus (None: no GPU, whatever the worker has). The worker's own
    device ids are ``TUSREC_WORKER_GPUS`` if set (e.g. '2' or '2,3'), else the first id of
    ``CUDA_VISIBLE_DEVICES`` (dask-cuda puts a worker's own device first there); a worker
    with neither passes ``requested`` unchanged (one GPU per machine, as on a node pool of
    one-GPU nodes or a Kubernetes pod with one GPU).
    """
    if not requested:
        return None
    environ = os.environ if environ is None else environ
    own = environ.get(WORKER_GPUS_ENV, "").strip()
    if not own:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        own = visible.split(",")[0].strip() if visible else ""
    return f"device={own}" if own else requested


# --------------------------------------------------------------------------- running units


@dataclass
class UnitsDone:
    """What ``map_units`` got back: results by unit name, and the units Dask gave up on."""

    results: dict
    failed: dict  # unit name -> 'ExceptionType: message'


def map_units(
    client,
    fn: Callable,
    units: Iterable[tuple[str, tuple]],
    desc: str,
    on_result: Callable[[str, object], None] | None = None,
    resources: dict | None = None,
    retries: int = UNIT_RETRIES,
    total: int | None = None,
    done: int = 0,
) -> UnitsDone:
    """Run ``fn(*args)`` for each (name, args) as Dask futures, with a progress bar over
    units; call ``on_result(name, result)`` in this process as each one finishes.

    Each unit is one future with a key of its own (name + a token of this call), so two
    runs on one scheduler never share a result. A unit counts once: its result is taken
    from the one future that holds it, whichever worker (or attempt) made it. A unit that
    raised more than ``retries`` times, or whose workers kept dying (KilledWorker), is in
    ``failed``. ``total``/``done``: the bar's size and the units already done (skipped).
    """
    from distributed import as_completed

    token = uuid.uuid4().hex[:10]
    futures = {}
    for name, args in units:
        future = client.submit(
            fn, *args, key=f"{desc}-{name}-{token}", pure=False, resources=resources, retries=retries
        )
        futures[future] = name
    out = UnitsDone({}, {})
    bar = tqdm(total=total if total is not None else len(futures), desc=desc, unit="unit", disable=None)
    bar.update(done)
    try:
        for future in as_completed(futures):
            name = futures.pop(future)
            if future.status == "finished":
                result = future.result()
                out.results[name] = result
                if on_result is not None:
                    on_result(name, result)
            else:  # 'error' (raised, or KilledWorker) or 'cancelled' (the scheduler dropped it)
                try:
                    err = future.exception()
                except Exception as lost:
                    err = lost
                out.failed[name] = f"{type(err).__name__}: {err}"
                bar.write(f"{name}: not done ({out.failed[name]})")
            future.release()
            bar.update()
    finally:
        bar.close()
        for future in futures:  # interrupted: nothing left running for this client
            future.cancel()
    return out


def fail_if_units_failed(done: UnitsDone, what: str) -> None:
    if done.failed:
        names = ", ".join(sorted(done.failed)[:5])
        raise ClusterError(
            f"{len(done.failed)} {what} unit(s) could not be done on the cluster (e.g. {names}: "
            f"{next(iter(done.failed.values()))}); the others are written, a rerun does the rest"
        )


# --------------------------------------------------------------------------- recipes


def slurm_gpu_workers(
    partition: str,
    shared: str,
    account: str | None = None,
    walltime: str = "04:00:00",
    cores: int = 8,
    memory: str = "64GB",
    python: str | None = None,
    scheduler_host: str | None = None,
    **kwargs,
):
    """The README's Slurm recipe: a ``dask_jobqueue.SLURMCluster`` whose every job is one
    worker holding ``GPU=1`` on one GPU (``--gres=gpu:1``), with its own rootless podman
    service as its container engine (``DOCKER_HOST`` in the job's private temporary
    folder), the container's GPU given by its physical id (``TUSREC_WORKER_GPUS``), run
    from the checkout at ``shared`` (the folder every node sees, with the data and the
    results). ``cluster.scale(jobs=K)`` asks Slurm for K GPUs; pass
    ``cluster.scheduler_address`` to ``--cluster``. Extra keyword arguments go to
    SLURMCluster."""
    from dask_jobqueue import SLURMCluster

    prologue = [
        f"cd {shared}",
        f"export PYTHONPATH={shared}",
        f"export DASK_CONFIG={shared}/configs/dask",  # no fixed malloc trim threshold (SIFT)
        'sock="${TMPDIR:-/tmp}/tusrec-podman-${SLURM_JOB_ID}.sock"',
        'podman system service --time=0 unix://"$sock" &',
        'export DOCKER_HOST="unix://$sock"',
        'export TUSREC_WORKER_GPUS="${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"',
        'for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done',
    ]
    scheduler = {"host": scheduler_host} if scheduler_host else {}
    return SLURMCluster(
        queue=partition,
        account=account,
        walltime=walltime,
        cores=cores,
        processes=1,  # one worker per job: the GPU slot
        memory=memory,
        python=python or f"{shared}/.venv/bin/python",
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", f"{GPU}=1"],
        job_script_prologue=prologue,
        scheduler_options=scheduler,
        **kwargs,
    )
