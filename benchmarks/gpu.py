"""``make bench-gpu``: the CUDA paths measured on whatever GPU the machine has (~10 min).

1. ``./predict`` on the GPU (the batched vmap pass of the shipped ensemble, autocast)
   against ``./predict --device cpu`` on the same simulated scans: the largest
   differences of the local transforms (matrix entries, rotation in rad, translation in
   mm) and of the resulting per-scan GPE (each scored with ``./evaluate score``);
2. one 1,600-frame 480 x 640 scan end to end on the GPU (``./predict``, wall clock);
3. ``tusrec train`` with mixed precision for 2 minutes (``--max-seconds``): steps/s.

Results go to a JSON file (default benchmarks/gpu.json). Everything it needs it
simulates itself (synthetic data). Without CUDA it stops at once with one line and exit
status 2; ``--device cpu`` (with ``--frames``, ``--train-seconds`` ... to shrink it) runs
every part on the CPU instead, to prove the script end to end where no GPU exists
(then part 1 compares the CPU with itself). Benchmarks are not tests: nothing asserts.

The commands run as child processes with this interpreter (``python -m tusrec --as
predict`` is what ``./predict`` runs), so a machine without the project's .venv works too.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("torch", "roma", "numpy", "scipy", "h5py", "cv2", "pandas", "matplotlib", "tqdm")


def tusrec(*args: str, as_: str | None = None) -> tuple[float, str]:
    """Run a tusrec command in a child process; (wall seconds, its stdout). Raises with its
    stderr's tail when it fails."""
    cmd = [sys.executable, "-m", "tusrec", *(["--as", as_] if as_ else []), *map(str, args)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def simulate(out: Path, *args: str) -> None:
    tusrec("simulate", out, "--no-landmarks", *args)


def read_locals(folder: Path) -> dict[str, np.ndarray]:
    """transforms_local (N-1, 4, 4) of every prediction file of a folder, float64."""
    import h5py

    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem] = f["transforms_local"][()].astype(np.float64)
    return out


def read_metrics(folder: Path) -> dict[str, dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return {row["key"]: row for row in csv.DictReader(f)}


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def compare_predictions(work: Path, device: str, frames: int) -> dict:
    """Part 1: the same scans predicted on ``device`` and on the CPU."""
    from tusrec.geometry import matrix_to_pose6

    data = work / "compare-data"
    simulate(data, "--subjects", "60", "--frames", frames, "--scans", "LH_Par_C_DtP,RH_Per_L_PtD")
    simulate(data, "--subjects", "60", "--frames", frames, "--protocol", "2025", "--scans", "LH_rotation")
    result: dict = {"scans": 3, "frames_per_scan": int(frames)}
    for name, dev in (("device", device), ("cpu", "cpu")):
        pred = work / f"compare-{name}"
        seconds, _ = tusrec("--input", data, "--output", pred, "--device", dev, as_="predict")
        rows = read_rows(pred)
        result[f"{name}_predict_s"] = round(seconds, 2)
        result[f"{name}_scans"] = [
            {k: r.get(k) for k in ("key", "status", "device", "members", "seconds", "network_s")}
            for r in rows
        ]
        tusrec("evaluate", "score", pred, "--data", data, "--out", work / f"scores-{name}")
    a, b = read_locals(work / "compare-device"), read_locals(work / "compare-cpu")
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    # 6-DoF differences: rotation vector (rad), translation (mm)
    d6 = {k: np.abs(matrix_to_pose6(a[k]) - matrix_to_pose6(b[k])) for k in a}
    ma, mb = read_metrics(work / "scores-device"), read_metrics(work / "scores-cpu")
    gpe = {k: (float(ma[k]["GPE"]), float(mb[k]["GPE"])) for k in a}
    result.update(
        {
            "max_abs_diff_matrix": max(float(np.abs(a[k] - b[k]).max()) for k in a),
            "max_abs_diff_rotation_vector_rad": max(float(d[:, :3].max()) for d in d6.values()),
            "max_abs_diff_translation_mm": max(float(d[:, 3:].max()) for d in d6.values()),
            "GPE_mm": {k: {"device": g[0], "cpu": g[1]} for k, g in gpe.items()},
            "max_abs_diff_GPE_mm": max(abs(g[0] - g[1]) for g in gpe.values()),
        }
    )
    for folder in ("compare-device", "compare-cpu"):  # GBs of DDFs
        shutil.rmtree(work / folder)
    return result


def time_long_scan(work: Path, device: str, frames: int) -> dict:
    """Part 2: one long scan end to end (read, network, DDFs written)."""
    data = work / "long-data"
    simulate(data, "--subjects", "61", "--frames", frames, "--scans", "LH_Per_L_DtP")
    pred = work / "long-pred"
    seconds, _ = tusrec("--input", data, "--output", pred, "--device", device, as_="predict")
    (row,) = read_rows(pred)
    size = sum(p.stat().st_size for p in pred.glob("*.h5"))
    shutil.rmtree(pred)
    return {
        "frames": int(frames),
        "image": "480x640",
        "wall_s": round(seconds, 2),
        "predictor_seconds": float(row["seconds"]),
        "status": row["status"],
        "members": row.get("members"),
        "network_s": row.get("network_s"),
        "read_s": row.get("read_s"),
        "write_s": row.get("write_s"),
        "prediction_GB": round(size / 1e9, 2),
    }


def train(work: Path, device: str, seconds: float, frames: str, workers: int) -> dict:
    """Part 3: the shipped member configuration trained for ``seconds`` (mixed precision
    on a GPU, as `tusrec train` does by default there)."""
    import torch

    from tusrec.train.trainer import amp_dtype

    data = work / "train-data"
    simulate(data, "--layout", "train", "--subjects", "0-2", "--frames", frames, "--scans", "6")
    run = work / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    args = ["train", data, "--out", run, "--config", ROOT / "configs/member.json", "--device", device]
    args += ["--steps", "1000000", "--val-subjects", "002", "--max-seconds", seconds]
    args += ["--workers", workers, "--cache", work / "train-cache"]
    wall, _ = tusrec(*args)
    with open(run / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    steps, spent = int(log[-1]["step"]), float(log[-1]["seconds"])
    # Steps/s between log rows that include no validation (every 500 steps and the last).
    rates = [
        (int(b["step"]) - int(a["step"])) / (float(b["seconds"]) - float(a["seconds"]))
        for a, b in itertools.pairwise(log)
        if not b["val_GPE"] and float(b["seconds"]) > float(a["seconds"])
    ]
    dtype = amp_dtype(torch.device(device))
    return {
        "config": "configs/member.json (batch 8 clips x 24 frames, 64 x 80 + decorrelation)",
        "precision": str(dtype).replace("torch.", "") if dtype else "float32",
        "workers": workers,
        "steps": steps,
        "train_s": spent,
        "steps_per_s": steps / spent,
        "steps_per_s_between_validations_median": float(np.median(rates)) if rates else None,
        "wall_s_with_startup_and_cache": round(wall, 1),
        "last_loss": float(log[-1]["loss"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.json")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1 ..., or cpu to prove the script")
    p.add_argument(
        "--work", type=Path, default=ROOT / "bench-data" / "gpu", help="simulated data (deleted after)"
    )
    p.add_argument("--frames", type=int, default=200, help="frames per scan of part 1 (default 200)")
    p.add_argument("--long-frames", type=int, default=1600, help="frames of part 2's scan (default 1600)")
    p.add_argument("--train-seconds", type=float, default=120.0, help="part 3's training time (default 120)")
    p.add_argument("--train-frames", default="100-150", help="frames per training scan (default 100-150)")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers of part 3 (default 4)")
    p.add_argument("--keep", action="store_true", help="keep the simulated data in --work")
    args = p.parse_args(argv)

    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench-gpu: missing Python packages {missing}: install requirements.txt", file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"bench-gpu: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU, or with --device cpu to try the script",
            file=sys.stderr,
        )
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "synthetic": True,
    }
    t0 = time.perf_counter()
    parts = (
        ("predict_vs_cpu", lambda: compare_predictions(args.work, args.device, args.frames)),
        ("long_scan", lambda: time_long_scan(args.work, args.device, args.long_frames)),
        ("train", lambda: train(args.work, args.device, args.train_seconds, args.train_frames, args.workers)),
    )
    failed = False
    for name, run in parts:
        t = time.perf_counter()
        try:
            results[name] = run()
        except Exception as err:  # a part that fails is recorded; the others still run
            results[name] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
            failed = True
        results[name]["part_s"] = round(time.perf_counter() - t, 1)
        print(f"bench-gpu: {name}: {json.dumps(results[name])}", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # what is done so far
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"bench-gpu: wrote {args.out} ({results['total_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
