"""Memory of training processes sharing one data cache: 1 process against N.

    python -m benchmarks.train_memory DATA --cache DIR [--processes 1 2] [--steps 60]

Builds the cache once (not measured), then for each count N starts N ``tusrec train``
processes on DATA with ``--cache DIR`` (one torch thread, ``--workers`` data-loader
workers each, different seeds and run folders) and samples /proc every 0.2 s until all
have finished. Per process tree (trainer + its workers) it records the peak resident
set (RSS: shared pages counted in every process that maps them) and, for all trees
together, the peak proportional set size (PSS: a page shared by k processes counts 1/k
in each; the sum is the memory the trainers take from the machine) and its file-backed
part (the memory-mapped cache, among other files). ``--no-cache`` measures the same
without a cache folder: every process then holds the preprocessed scans itself.
Benchmarks are not tests: nothing asserts; the numbers go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def _mapped(pid: int, folder: str) -> tuple[int, int]:
    """(Rss, Pss) kB of the mappings of files under ``folder`` (the cache) in process pid."""
    rss = pss = 0
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    inside = line.rstrip().endswith(".npy") and folder in line
                elif inside and first == "Rss:":
                    rss += int(line.split()[1])
                elif inside and first == "Pss:":
                    pss += int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def measure(data: Path, cache: Path | None, processes: int, steps: int, workers: int, config: Path) -> dict:
    runs = Path(tempfile.mkdtemp(prefix="train-memory-"))
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "tusrec", "train", str(data), "--out", str(runs / f"m{i}")]
        cmd += ["--config", str(config), "--seed", str(i), "--steps", str(steps), "--threads", "1"]
        cmd += ["--workers", str(workers), "--val-subjects", "0.25"]
        cmd += ["--cache", str(cache)] if cache else []
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    peak_rss = [0] * processes  # kB, per tree (sum over the tree's processes)
    peak_main_rss = [0] * processes
    peak_pss = peak_pss_file = peak_pss_anon = 0
    peak_cache_rss = [0] * processes  # kB of cache pages mapped, per tree (as RSS counts them)
    peak_cache_pss = 0  # kB, all trees (each page once)
    t0 = time.perf_counter()
    while any(p.poll() is None for p in procs):
        pss = pss_file = pss_anon = 0
        for i, p in enumerate(procs):
            tree = [_rollup(q) for q in _tree(p.pid)]
            peak_rss[i] = max(peak_rss[i], sum(r.get("Rss", 0) for r in tree))
            peak_main_rss[i] = max(peak_main_rss[i], tree[0].get("Rss", 0) if tree else 0)
            pss += sum(r.get("Pss", 0) for r in tree)
            pss_file += sum(r.get("Pss_File", 0) for r in tree)
            pss_anon += sum(r.get("Pss_Anon", 0) for r in tree)
        if pss > peak_pss:
            peak_pss, peak_pss_file, peak_pss_anon = pss, pss_file, pss_anon
        if cache:
            cache_pss = 0
            for i, p in enumerate(procs):
                mapped = [_mapped(q, str(cache)) for q in _tree(p.pid)]
                peak_cache_rss[i] = max(peak_cache_rss[i], sum(m[0] for m in mapped))
                cache_pss += sum(m[1] for m in mapped)
            peak_cache_pss = max(peak_cache_pss, cache_pss)
        time.sleep(0.2)
    errors = [p.stderr.read().decode()[-500:] for p in procs if p.returncode != 0]
    return {
        "processes": processes,
        "workers_each": workers,
        "cache": str(cache) if cache else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_MB_per_tree": [round(v / 1024) for v in peak_rss],
        "peak_rss_MB_per_trainer": [round(v / 1024) for v in peak_main_rss],
        "peak_pss_MB_all": round(peak_pss / 1024),
        "pss_file_MB_at_peak": round(peak_pss_file / 1024),
        "pss_anon_MB_at_peak": round(peak_pss_anon / 1024),
        "cache_rss_MB_per_tree": [round(v / 1024) for v in peak_cache_rss],
        "cache_pss_MB_all": round(peak_cache_pss / 1024),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--no-cache", action="store_true", help="each process holds the scans in its own memory")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "member.json")
    args = p.parse_args(argv)
    cache = None if args.no_cache else args.cache
    if cache:  # built once, before anything is measured
        from tusrec.train.cache import load_cache
        from tusrec.train.config import TrainConfig
        from tusrec.train.trainer import cache_steps

        cfg = TrainConfig.load(args.config)
        data = load_cache(args.data, cfg.model_config.input_size, None, False, cache_steps(cfg), cache)
        size = sum(f.stat().st_size for f in cache.glob("*.npy"))
        print(json.dumps({"scans": len(data.scans), "cache_MB": round(size / 2**20)}), flush=True)
    for n in args.processes:
        print(json.dumps(measure(args.data, cache, n, args.steps, args.workers, args.config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
