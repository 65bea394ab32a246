"""``make bench``: measure speed and peak memory, write them to a JSON file and a table.

Each measurement runs in a child process of its own, so its peak resident memory
(ru_maxrss) is that measurement's alone, imports included. Benchmarks are not tests:
nothing here asserts; the numbers are written down for the README and closing notes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHES: dict[str, callable] = {}


def bench(fn):
    BENCHES[fn.__name__] = fn
    return fn


def smooth_tforms(n: int, seed: int = 0) -> np.ndarray:
    """A smooth freehand-like trajectory of n tracker poses (N, 4, 4), ~0.5 mm a frame."""
    from tusrec.geometry import pose6_to_matrix

    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    rot = 0.05 * np.sin(t / 200 + rng.uniform(0, 6, 3))
    trans = np.array([300.0, -100.0, 800.0]) + t * np.array([0.5, 0.05, 0.02]) + rng.normal(0, 0.02, (n, 3))
    return pose6_to_matrix(np.concatenate([rot, trans], axis=1))


@bench
def simulate(frames: int = 200) -> dict:
    """Simulation speed at 480 x 640 (anatomy set-up excluded, measured apart)."""
    from tusrec.simulate import simulate_scan

    t0 = time.perf_counter()
    simulate_scan(60, "LH_Per_L_DtP", 3).frames()  # builds and caches the subject's anatomy
    setup = time.perf_counter() - t0
    results = {}
    for name in ("LH_Per_C_DtP", "RH_Par_S_PtD"):
        t0 = time.perf_counter()
        sim = simulate_scan(60, name, frames)
        n = sum(len(c) for c in sim.frame_chunks())
        results[name] = n / (time.perf_counter() - t0)
    return {
        "frames": frames,
        "image": "480x640",
        "anatomy_setup_s": setup,
        "frames_per_s": min(results.values()),
        "per_scan_frames_per_s": results,
    }


@bench
def ground_truth(frames: int = 200, write: bool = False) -> dict:
    """GP + LP generation from tforms at 480 x 640; optionally written to a predictions file."""
    from tusrec.data import PredictionWriter
    from tusrec.ddf import GroundTruth
    from tusrec.geometry import default_calibration

    gt = GroundTruth.from_tforms(smooth_tforms(frames), default_calibration(), (480, 640))
    t0 = time.perf_counter()
    if write:
        tmp = Path(tempfile.mkdtemp(dir=Path.cwd()))
        try:
            with PredictionWriter(tmp / "gt.h5", frames, (480, 640)) as out:
                for start, gp, lp in gt.iter_pixel_ddfs():
                    out.write_pixels(start, gp, lp)
            size = (tmp / "gt.h5").stat().st_size
        finally:
            shutil.rmtree(tmp)
    else:
        checksum = 0.0
        for _, gp, lp in gt.iter_pixel_ddfs():
            checksum += float(gp[:, 0, 0].sum() + lp[:, 0, 0].sum())
        size = (frames - 1) * 2 * 3 * 480 * 640 * 4
    seconds = time.perf_counter() - t0
    return {
        "frames": frames,
        "written_to_h5": write,
        "seconds": seconds,
        "frames_per_s": (frames - 1) / seconds,
        "GB_per_s": size / seconds / 1e9,
    }


@bench
def score_compact(frames: int = 200) -> dict:
    """Scoring of a compact prediction (form=transforms) at 480 x 640: GPE and LPE from
    the predicted matrices against the truth (metrics.rigid_pixel_errors), against the
    ground truth's GP + LP generation (compute only, as ``ground_truth``: the speed to
    match) measured in the same process, and the comparison of the two generated float32
    fields (pixel_errors of a TransformField, what compact scoring did before). compute_s:
    the scoring in this process; score_file_s: the whole per-scan judgement through the
    bounded worker (start-up of the worker included)."""
    import h5py

    from tusrec.data import open_data, write_scan
    from tusrec.ddf import GroundTruth
    from tusrec.geometry import default_calibration, pose6_to_matrix, write_calibration
    from tusrec.scoring.metrics import TransformField, pixel_errors
    from tusrec.scoring.score import score_file, score_prediction_file

    calib = default_calibration()
    tforms = smooth_tforms(frames)
    gt = GroundTruth.from_tforms(tforms, calib, (480, 640))
    noise = pose6_to_matrix(np.random.default_rng(1).normal(0, [0.01] * 3 + [0.5] * 3, (frames - 1, 6)))
    tmp = Path(tempfile.mkdtemp(dir=Path.cwd()))
    try:
        path = tmp / "compact.h5"
        with h5py.File(path, "w") as f:
            f.attrs["form"] = "transforms"
            f["transforms_global"] = gt.global_ @ noise
            f["transforms_local"] = gt.local @ noise
        t0 = time.perf_counter()
        for _ in gt.iter_pixel_ddfs():
            pass
        generation = time.perf_counter() - t0
        t0 = time.perf_counter()
        errors = score_prediction_file(path, (frames, 480, 640), gt, None)
        compute = time.perf_counter() - t0
        t0 = time.perf_counter()
        fields = pixel_errors(
            TransformField(gt.global_ @ noise, calib.T_scale, (480, 640)),
            gt.global_,
            calib.T_scale,
            (480, 640),
        )
        fields_s = time.perf_counter() - t0  # GP only: one of the two fields
        write_scan(
            tmp / "data", "eval", "050", "LH_Par_C_DtP", np.zeros((frames, 480, 640), np.uint8), tforms
        )
        write_calibration(tmp / "data" / "calib_matrix.csv", calib)
        scan = open_data(tmp / "data").scans[0]
        t0 = time.perf_counter()
        row = score_file(scan, path, None, calib)
        judged = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp)
    return {
        "frames": frames,
        "compute_s": compute,
        "frames_per_s": (frames - 1) / compute,
        "ground_truth_generation_s": generation,
        "ground_truth_frames_per_s": (frames - 1) / generation,
        "ratio_to_ground_truth": generation / compute,
        "generated_fields_frames_per_s": (frames - 1) / (2 * fields_s),
        "generated_fields_GPE_difference": abs(fields.error - errors["GPE"]),
        "score_file_s": judged,
        "score_file_frames_per_s": (frames - 1) / judged,
        "status": row["status"],
        "GPE": errors["GPE"],
        "LPE": errors["LPE"],
    }


@bench
def landmarks(frames: int = 500) -> dict:
    """SIFT landmarks of one simulated 500-frame 480 x 640 scan."""
    from tusrec.data import open_data
    from tusrec.landmarks import extract_landmarks
    from tusrec.simulate.dataset import simulate_dataset

    tmp = Path(tempfile.mkdtemp(dir=Path.cwd()))
    try:
        simulate_dataset(tmp, [61], names=["LH_Par_C_DtP"], frames=frames, landmarks=False)
        scan = open_data(tmp).scans[0]
        t0 = time.perf_counter()
        lm = extract_landmarks(scan)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp)
    return {"frames": frames, "k": len(lm), "seconds_per_scan": seconds}


BENCH_DATA = Path("bench-data/speed")  # deleted after the run; bench-data/accuracy is kept
ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = ROOT / "weights"


def _noisy(transforms: np.ndarray, seed: int) -> np.ndarray:
    from tusrec.geometry import pose6_to_matrix

    rng = np.random.default_rng(seed)
    return transforms @ pose6_to_matrix(rng.normal(0, [0.002] * 3 + [0.1] * 3, (len(transforms), 6)))


@bench
def score_setup(frames: int) -> dict:
    """A 480 x 640 scan of ``frames`` frames and a noisy prediction of it (not timed)."""
    from tusrec.data import (
        EVAL,
        open_data,
        write_data_calibration,
        write_dataset_keys,
        write_landmarks,
        write_scan,
    )
    from tusrec.ddf import GroundTruth, write_predictions
    from tusrec.geometry import default_calibration

    root = BENCH_DATA / f"score{frames}"
    shutil.rmtree(root, ignore_errors=True)
    calib = default_calibration()
    tforms = smooth_tforms(frames)
    chunks = (np.full((min(64, frames - s), 480, 640), 100, np.uint8) for s in range(0, frames, 64))
    write_scan(root / "data", EVAL, 90, "LH_Par_L_DtP", chunks, tforms)
    write_dataset_keys(root / "data", ["sub090__LH_Par_L_DtP"])
    write_data_calibration(root / "data", calib)
    lm = np.stack([np.arange(1, 21) * (frames - 1) // 21 + 1, np.full(20, 320), np.full(20, 240)], axis=1)
    write_landmarks(root / "data" / "landmark" / "landmark_090.h5", {"LH_Par_L_DtP": lm})
    gt = GroundTruth.from_tforms(tforms, calib, (480, 640))
    scan = open_data(root / "data").scans[0]
    pred = root / "pred" / f"{scan.key}.h5"
    write_predictions(pred, _noisy(gt.global_, 1), _noisy(gt.local, 2), calib, (480, 640), lm)
    return {"frames": frames, "prediction_GB": pred.stat().st_size / 1e9}


def _drop_page_cache() -> bool:
    """Empty the page cache so reads come from the disk (needs root; False if refused)."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


@bench
def score(frames: int) -> dict:
    """Peak memory and throughput of `evaluate score` on one scan, against the raw read
    speed of the same prediction file. Both start from an empty page cache when the
    machine allows it (``cold``), so the raw figure is the disk's own read speed."""
    from tusrec.data import open_data
    from tusrec.scoring.score import score_predictions

    root = BENCH_DATA / f"score{frames}"
    pred = next((root / "pred").glob("*.h5"))
    size = pred.stat().st_size
    cold = _drop_page_cache()
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    with open(pred, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    raw = time.perf_counter() - t0
    shutil.rmtree(root / "scores", ignore_errors=True)
    cold = _drop_page_cache() and cold
    t0 = time.perf_counter()
    table = score_predictions(root / "pred", open_data(root / "data"), root / "scores")
    seconds = time.perf_counter() - t0
    return {
        "frames": frames,
        "prediction_GB": size / 1e9,
        "cold_page_cache": cold,
        "score_s": seconds,
        "score_GB_per_s": size / seconds / 1e9,
        "raw_read_GB_per_s": size / raw / 1e9,
        "ratio_score_to_raw": raw / seconds,
        "GPE": float(table["GPE"].iloc[0]),
        "LPE": float(table["LPE"].iloc[0]),
    }


@bench
def predict_setup(frames: int) -> dict:
    """A simulated 480 x 640 scan with landmarks. The predictor runs the shipped ensemble
    (weights/); without one, 4 untrained members of the default configuration stand in
    (the same compute). Not timed."""
    import torch

    from tusrec.model.ensemble import MANIFEST, save_member
    from tusrec.model.network import ModelConfig, TrackerlessNet
    from tusrec.simulate.dataset import simulate_dataset

    root = BENCH_DATA / f"predict{frames}"
    shutil.rmtree(root, ignore_errors=True)
    simulate_dataset(root / "data", [62], names=["RH_Per_S_DtP"], frames=frames, landmarks=True)
    if not (SHIPPED_WEIGHTS / MANIFEST).is_file():
        for i in range(4):
            torch.manual_seed(i)
            save_member(root / "weights", f"untrained{i}", TrackerlessNet(ModelConfig()), {"trained": "no"})
    return {"frames": frames, "weights": "shipped" if (SHIPPED_WEIGHTS / MANIFEST).is_file() else "untrained"}


def _predictor_paths(root: Path, weights: Path, repeats: int = 3) -> dict:
    """Members one by one on torch's threads (workers=1: the predictor before members ran
    side by side) against side by side (the CPU default), interleaved in one process,
    ``repeats`` times each: read and network seconds, and whether the transforms agree to
    the last bit."""
    from tusrec.data import open_data
    from tusrec.model.ensemble import load_members
    from tusrec.predict.core import Predictor

    scan = open_data(root / "data").scans[0]
    members = load_members(weights)
    paths = {"one_by_one": Predictor(members, "cpu", workers=1), "side_by_side": Predictor(members, "cpu")}
    runs: dict = {name: [] for name in paths}
    local = {}
    for _ in range(repeats):
        for name, predictor in paths.items():
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            inputs = predictor.read_preprocessed(scan)
            t1 = time.perf_counter()
            local[name] = predictor.predict_local(inputs, float("inf")).local
            t2 = time.perf_counter()
            runs[name].append({"read_s": t1 - t0, "network_s": t2 - t1, "total_s": t2 - t0, "load": load})
    return {**runs, "bit_identical": bool(np.array_equal(local["one_by_one"], local["side_by_side"]))}


@bench
def predict(frames: int, form: str = "ddf") -> dict:
    """End-to-end `predict` of one scan, split into reading, network and writing. Dense
    (form 'ddf'): the writing split further into DDF generation and writing, and the same
    number of bytes written raw to the same disk. Compact (form 'transforms'): also the
    whole `./predict` command as a user runs it (interpreter start, imports, weights)."""
    from tusrec.data import open_data
    from tusrec.ddf import GroundTruth
    from tusrec.predict import predict_folder

    root = BENCH_DATA / f"predict{frames}"
    out = root / "pred"
    shutil.rmtree(out, ignore_errors=True)
    weights = root / "weights" if (root / "weights").is_dir() else SHIPPED_WEIGHTS
    row = predict_folder(root / "data", out, weights, "cpu", log=lambda *a: None, form=form)[0]
    size = next(out.glob("*.h5")).stat().st_size
    result = {
        "frames": frames,
        "form": form,
        "members": int(row["members"]),
        "total_s": float(row["seconds"]),
        "read_s": float(row["read_s"]),
        "network_s": float(row["network_s"]),
        "registration_s": float(row.get("registration_s", 0.0)),
        "write_s": float(row["write_s"]),
        "output_bytes": size,
    }
    if form != "ddf":
        result["one_by_one_vs_side_by_side"] = _predictor_paths(root, weights)
        command = root / "pred-command"
        shutil.rmtree(command, ignore_errors=True)
        argv = [str(ROOT / "predict"), "--input", str(root / "data"), "--output", str(command)]
        argv += ["--weights", str(weights), "--device", "cpu", "--format", form]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        result["command_s"] = time.perf_counter() - t0
        return result
    # DDF generation alone (no writing), on the same number of frames.
    scan = open_data(root / "data").scans[0]
    gt = GroundTruth.from_scan(scan, open_data(root / "data").calibration)
    t0 = time.perf_counter()
    for _ in gt.iter_pixel_ddfs():
        pass
    generation = time.perf_counter() - t0
    # Raw write of the same bytes the way the h5 file is written: through the page
    # cache, no fsync, so the comparison is like for like.
    block = np.random.default_rng(0).random(16 << 20).astype(np.float32).tobytes()
    t0 = time.perf_counter()
    with open(root / "raw.bin", "wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)
    raw = time.perf_counter() - t0
    return {
        **result,
        "ddf_generation_s": generation,
        "ddf_writing_s": float(row["write_s"]) - generation,
        "ddf_generate_and_write_s": float(row["write_s"]),
        "raw_write_same_bytes_s": raw,
        "ratio_ddf_to_raw_write": float(row["write_s"]) / raw,
        "output_GB": size / 1e9,
    }


@bench
def registration(frames: int) -> dict:
    """In-plane registration of one 480 x 640 scan (`predict --in-plane registration`,
    tusrec.model.registration), started from no motion: resampling to square pixels, then
    the frame pairs on 1 thread and on all cores; seconds a pair (the predictor's
    REGISTRATION_S_PER_PAIR reserve), and whether both give the same numbers; then the
    pairs' decorrelation for the error model (pair_decorrelation), likewise."""
    from tusrec.data import open_data, usable_cores
    from tusrec.model.registration import pair_decorrelation, register_in_plane, square_frames

    if not (BENCH_DATA / f"predict{frames}" / "data").is_dir():  # run alone (--only)
        predict_setup(frames)
    data = open_data(BENCH_DATA / f"predict{frames}" / "data")
    scan = data.scans[0]
    t0 = time.perf_counter()
    square = square_frames((block for _, block in scan.iter_frames()), data.calibration)
    resample = time.perf_counter() - t0
    result = {"frames": frames, "resample_s": resample, "square_size": list(square.frames.shape[1:])}
    fitted = {}
    for workers in sorted({1, usable_cores()}):
        t0 = time.perf_counter()
        fitted[workers], registered = register_in_plane(square, workers=workers)
        seconds = time.perf_counter() - t0
        result[f"workers_{workers}"] = {
            "s": seconds,
            "s_per_pair": seconds / (frames - 1),
            "registered": int(registered.sum()),
        }
    result["same_on_any_workers"] = all(np.array_equal(fitted[1], f) for f in fitted.values())
    residual = {}
    for workers in sorted({1, usable_cores()}):
        t0 = time.perf_counter()
        residual[workers] = pair_decorrelation(square, fitted[1], workers)
        seconds = time.perf_counter() - t0
        result[f"decorrelation_workers_{workers}"] = {"s": seconds, "s_per_pair": seconds / (frames - 1)}
    result["decorrelation_same_on_any_workers"] = all(
        np.array_equal(residual[1], r) for r in residual.values()
    )
    result["load_average"] = os.getloadavg()[0]
    return result


_BENCH_MODELS = """
import numpy as np


def rigid(frames, device):
    local = np.tile(np.eye(4), (len(frames) - 1, 1, 1))
    local[:, 0, 3] = 0.2
    return local


def template(frames, landmark, data_path_calib, device):
    n, h, w = frames.shape
    pixels = np.zeros((n - 1, 3, h * w), np.float32)  # GP and LP: one array, returned twice
    marks = np.zeros((3, len(landmark)), np.float32)
    return pixels, marks, pixels, marks
"""


@bench
def model_interface(frames: int = 500, repeats: int = 3) -> dict:
    """What `./predict --model` adds around a team's model on one 480 x 640 scan: a trivial
    rigid model (compact and dense form) and a trivial template model (dense), each run
    through the kit (tusrec.predict.predict_folder with load_model) and called bare on the
    same frames in memory, ``repeats`` times interleaved. The kit's overhead is the scan's
    seconds less the model call (model_s): reading the frames, the thread hand-off, the
    checks and the writing (the reading, the writing and the rest given apart)."""
    from tusrec.data import open_data
    from tusrec.ddf import DEFAULT_CHUNK
    from tusrec.predict import predict_folder
    from tusrec.predict.interface import ModelThread, load_model

    root = BENCH_DATA / f"predict{frames}"
    if not (root / "data").is_dir():  # run alone (--only)
        predict_setup(frames)
    folder = Path(tempfile.mkdtemp(dir=Path.cwd()))
    try:
        (folder / "bench_models.py").write_text(_BENCH_MODELS)
        data = open_data(root / "data")
        scan = data.scans[0]
        frames_in_memory = scan.read_frames()
        landmark = scan.read_landmarks()
        cases = {
            "rigid_transforms": ("rigid", "transforms"),
            "rigid_ddf": ("rigid", "ddf"),
            "template_ddf": ("template", "ddf"),
        }
        runs: dict = {name: [] for name in cases}
        for _ in range(repeats):
            for name, (kind, form) in cases.items():
                model = load_model(f"{folder / 'bench_models.py'}:{kind}", form)
                args = (
                    (frames_in_memory, "cpu")
                    if kind == "rigid"
                    else (frames_in_memory, landmark, str(data.calibration_path), "cpu")
                )
                t0 = time.perf_counter()
                out = model.obj(*args)
                bare = time.perf_counter() - t0
                del out
                shutil.rmtree(folder / "pred", ignore_errors=True)
                row = predict_folder(
                    root / "data", folder / "pred", device="cpu", log=lambda *a: None, model=model
                )[0]
                assert row["status"] == "ok", row
                runs[name].append(
                    {
                        "bare_call_s": bare,
                        "scan_s": float(row["seconds"]),
                        "model_s": float(row["model_s"]),
                        "read_s": float(row["read_s"]),
                        "write_s": float(row["write_s"]),
                        "overhead_s": float(row["seconds"]) - float(row["model_s"]),
                        "rest_s": float(row["seconds"] - row["model_s"] - row["read_s"] - row["write_s"]),
                        "output_bytes": next((folder / "pred").glob("*.h5")).stat().st_size,
                        "load": os.getloadavg()[0],
                    }
                )
        medians = {
            name: {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "load"}
            for name, rs in runs.items()
        }
        # Two parts of the overhead on their own: the hand-off of a call to the model's thread
        # and back (a no-op, 1,000 times), and the template's NaN check of GP and LP (the
        # chunked check write_dense makes, without the writing).
        thread = ModelThread()
        t0 = time.perf_counter()
        for _ in range(1000):
            thread.call(lambda: None, time.perf_counter() + 60)
        hand_off = (time.perf_counter() - t0) / 1000
        pixels = np.zeros((frames - 1, 3, 480 * 640), np.float32)
        t0 = time.perf_counter()
        for start in range(0, frames - 1, DEFAULT_CHUNK):
            for arr in (pixels, pixels):
                np.isfinite(arr[start : start + DEFAULT_CHUNK].reshape(-1, 480 * 640)).all(axis=1)
        finite_check = time.perf_counter() - t0
        return {
            "frames": frames,
            "image": "480x640",
            "repeats": repeats,
            "median": medians,
            "thread_hand_off_s": hand_off,
            "template_finite_check_s": finite_check,
            "runs": runs,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _demo_commands(demo: Path) -> list[str]:
    """The commands of `make demo` (its recipe as `make -n` prints it, continuation lines
    joined), with the demo folder at ``demo``; the set-up of the venv left out."""
    out = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "demo", f"DEMO={demo}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.replace("\\\n", " ").splitlines()
    return [c for c in lines if c.strip() and not c.startswith("echo ")]


@bench
def demo() -> dict:
    """`make demo` once the venv exists, command by command (a process each, as make runs
    them), in a fresh folder: seconds per step, the whole, and the disk it leaves."""
    folder = (BENCH_DATA / "demo").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    steps = []
    t00 = time.perf_counter()
    for command in _demo_commands(folder):
        t0 = time.perf_counter()
        subprocess.run(command, shell=True, cwd=ROOT, check=True, capture_output=True)
        steps.append({"command": command.replace(str(folder), "demo")[:160], "s": time.perf_counter() - t0})
    total = time.perf_counter() - t00
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return {"total_s": total, "disk_MB": disk / 1e6, "steps": steps, "load_average": os.getloadavg()[0]}


@bench
def rank(teams: int = 20, scans: int = 768, resamples: int = 2000) -> dict:
    """`evaluate rank` on synthetic teams: the vectorised bootstrap (scan- and subject-level,
    ranks, Kendall's tau, rank frequencies), the pairwise tests and the whole analysis
    without figures. Imports are warmed up first, so the times are the computation's."""
    from tusrec.ranking.rank import aggregate_then_rank, combine_teams, scan_scores
    from tusrec.ranking.report import analyse
    from tusrec.ranking.stats import all_pairwise, bootstrap
    from tusrec.ranking.synthetic import synthetic_tables

    data = combine_teams(synthetic_tables(teams, subjects=max(1, scans // 24), failure_rate=0.01, seed=0))
    scores = scan_scores(data, "minmax")
    ranking = aggregate_then_rank(data, scores)
    bootstrap(data, scores, ranking, 10, seed=1)  # warm-up
    all_pairwise(data.subset([0, 1]), scan_scores(data.subset([0, 1]), "minmax"))
    t0 = time.perf_counter()
    boots = bootstrap(data, scores, ranking, resamples, seed=0)
    for b in boots.values():
        b.summary(data.teams), b.frequency_table(data.teams)
    boot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_pairwise(data, scores)
    pairwise_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyse(data, None, resamples, seed=0)
    return {
        "teams": data.n_teams,
        "scans": data.n_scans,
        "resamples": resamples,
        "bootstrap_s": boot_s,
        "pairwise_tests_s": pairwise_s,
        "analysis_without_figures_s": time.perf_counter() - t0,
        "median_tau_scan_level": float(np.median(boots["scan"].tau)),
    }


# --------------------------------------------------------------------------- --cluster (issue 14)

CLUSTER_DATA = BENCH_DATA / "cluster"
PODMAN_BASE_IMAGE = "localhost/debian-base:bookworm"  # made by .ci/containers.sh
SLEEPER_IMAGE = "localhost/tusrec-bench-sleeper:latest"


def _local_cluster(workers: int, gpu: bool = False):
    """A LocalCluster as ``--cluster local:N`` makes it; returns (cluster, client, start s)."""
    import distributed

    from tusrec.cluster import local_cluster

    t0 = time.perf_counter()
    cluster = local_cluster(workers, gpu)
    client = distributed.Client(cluster)
    return cluster, client, time.perf_counter() - t0


@contextlib.contextmanager
def _podman_service():
    """A podman API service on a private socket (as tests/test_containers.py starts it);
    yields its DOCKER_HOST, or None without podman or its base image."""
    import docker

    if shutil.which("podman") is None:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-podman-"))
    conf = tmp / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(conf))}
    if subprocess.run(["podman", "image", "exists", PODMAN_BASE_IMAGE], env=env).returncode != 0:
        yield None
        return
    host = f"unix://{tmp / 'podman.sock'}"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", host],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ("DOCKER_HOST", "CONTAINERS_CONF")}
    try:
        for _ in range(300):
            try:
                docker.DockerClient(base_url=host).ping()
                break
            except Exception:
                time.sleep(0.1)
        os.environ.update(DOCKER_HOST=host, CONTAINERS_CONF=env["CONTAINERS_CONF"])
        yield host
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        service.terminate()
        service.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


@bench
def cluster_scaling_setup(scans: int = 16, sleep_s: float = 5.0) -> dict:
    """16 simulated 40-frame 120 x 160 scans, and a team image (the tests' Debian base, no
    Python) that sleeps ``sleep_s`` and copies the scan's valid prediction (made here from
    the ground truth) into /output. Not timed."""
    from tusrec.cli import main
    from tusrec.simulate.dataset import simulate_dataset

    shutil.rmtree(CLUSTER_DATA, ignore_errors=True)
    data = CLUSTER_DATA / "data"
    simulate_dataset(data, [70], names=None, frames=40, image_size=(120, 160), landmarks=True)
    from tusrec.data import open_data

    keys = open_data(data).keys[:scans]
    context = CLUSTER_DATA / "image"
    main(["reference", "ground-truth", str(data), "--out", str(context / "payload"), "--keys", *keys])
    (context / "run.sh").write_text(
        "#!/bin/bash\n"
        f"sleep {sleep_s}\n"
        "for f in /input/frames/*/*.h5; do s=$(basename $(dirname $f)); k=sub${s}__$(basename $f .h5); "
        "cp --no-preserve=all /opt/payload/$k.h5 /output/; done\n"
    )
    (context / "Dockerfile").write_text(
        f"FROM {PODMAN_BASE_IMAGE}\nCOPY payload /opt/payload/\nCOPY run.sh /opt/run.sh\n"
        'USER 10001:10001\nENTRYPOINT ["/bin/bash", "/opt/run.sh"]\n'
    )
    with _podman_service() as host:
        if host is None:
            return {"scans": len(keys), "podman": False}
        subprocess.run(
            ["podman", "build", "-q", "-t", SLEEPER_IMAGE, str(context)], check=True, capture_output=True
        )
    return {"scans": len(keys), "podman": True, "sleep_s": sleep_s}


def sleeper_unit(seconds: float) -> float:
    """The stand-in unit without podman: ``seconds`` of sleep through the same Dask path."""
    t0 = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - t0


@bench
def cluster_scaling(workers: tuple = (0, 1, 2, 4), scans: int = 16, sleep_s: float = 5.0) -> dict:
    """`./evaluate run` of one team on 16 scans, the team's container sleeping 5 s a scan:
    serial (0) and on local:1, local:2, local:4 (cluster start excluded, given apart).
    Ideal is scans x sleep / workers; efficiency = ideal / measured; the per-unit overhead
    is measured x workers / scans - sleep (start, wait, logs, removal, judging, merge)."""
    from tusrec.cluster import map_units
    from tusrec.data import open_data
    from tusrec.harness.cluster import run_teams
    from tusrec.harness.runner import Limits, Team
    from tusrec.harness.runner import run_teams as serial_run

    data = open_data(CLUSTER_DATA / "data")
    keys = data.keys[:scans]
    limits = Limits(60.0, "1g")
    out: dict = {"scans": len(keys), "sleep_s": sleep_s, "runs": []}
    with _podman_service() as host:
        out["podman"] = host is not None
        team = [Team("sleeper", SLEEPER_IMAGE)]
        for n in workers:
            folder = CLUSTER_DATA / f"run{n}"
            shutil.rmtree(folder, ignore_errors=True)
            start = 0.0
            if n == 0:
                if host is None:
                    continue
                load = _load()
                t0 = time.perf_counter()
                tables = serial_run(team, data, folder, limits, keys, log=lambda *a, **k: None)
                wall = time.perf_counter() - t0
            else:
                cluster, client, start = _local_cluster(n, gpu=True)
                tables = None
                try:
                    load = _load()
                    t0 = time.perf_counter()
                    if host is not None:
                        tables = run_teams(client, team, data, folder, limits, keys, log=lambda *a, **k: None)
                        assert (tables["sleeper"]["status"] == "ok").all()
                    else:
                        map_units(
                            client,
                            sleeper_unit,
                            [(k, (sleep_s,)) for k in keys],
                            "stand-in",
                            resources={"GPU": 1},
                        )
                    wall = time.perf_counter() - t0
                finally:
                    client.close()
                    cluster.close()
            slots = max(n, 1)
            ideal = len(keys) * sleep_s / slots
            overhead = wall * slots / len(keys) - sleep_s
            run = {
                "workers": n,
                "load_before": load,
                "load_after": _load(),
                "cluster_start_s": start,
                "wall_s": wall,
                "ideal_s": ideal,
                "efficiency": ideal / wall,
                "overhead_per_unit_s": overhead,
            }
            if tables is not None:
                # The container's life measured outside (start to exit, the runner's
                # runtime_s) less the sleep is its own start and stop (runc, bash, the copy);
                # the rest of the overhead is the runner's: create, remove, staging, judging,
                # the merge.
                container = float(tables["sleeper"]["runtime_s"].mean())
                run["container_start_stop_s"] = container - sleep_s
                run["runner_per_unit_s"] = overhead - (container - sleep_s)
            out["runs"].append(run)
            shutil.rmtree(folder, ignore_errors=True)
    return out


def _load() -> float:
    """The 1-minute load average now (the machine is shared: every figure carries it)."""
    return round(os.getloadavg()[0], 2)


@bench
def landmarks_cluster(scans: int = 4, frames: int = 80, workers: int = 2, repeats: int = 3) -> dict:
    """SIFT landmarks of the same scans (480 x 640), three ways side by side, ``repeats``
    rounds (best of them kept, each round's load average noted): serial with 1 SIFT
    thread, serial as ``./landmarks`` runs it (2 SIFT threads), and local:2 (one SIFT
    thread a worker; the cluster's start given apart). Also where serial time goes:
    reading the frames, SIFT itself (one thread, in-process), the top-k merge."""
    from tusrec import landmarks as lmk
    from tusrec.data import open_data
    from tusrec.landmarks import write_data_landmarks
    from tusrec.simulate import scan_names
    from tusrec.simulate.dataset import simulate_dataset

    root = CLUSTER_DATA / "landmarks"
    shutil.rmtree(root, ignore_errors=True)
    simulate_dataset(root, [71], names=scan_names("2024")[:scans], frames=frames, landmarks=False)
    data = open_data(root)
    rounds = []
    results = {}
    for _ in range(repeats):
        r = {"load_before": _load()}
        for label, threads in (("serial_1_thread", 1), ("serial_default", 2)):
            out = root / label
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            results[label] = write_data_landmarks(data, out_dir=out, threads=threads)
            r[f"{label}_s"] = time.perf_counter() - t0
        local, client, start = _local_cluster(workers)
        try:
            shutil.rmtree(root / "dask", ignore_errors=True)
            t0 = time.perf_counter()
            results["cluster"] = write_data_landmarks(data, out_dir=root / "dask", client=client)
            r["cluster_s"] = time.perf_counter() - t0
            r["cluster_start_s"] = start
        finally:
            client.close()
            local.close()
        r["load_after"] = _load()
        rounds.append(r)
    # Where a serial scan's time goes (one thread, back to back on each scan): reading the
    # frames, SIFT on them, and the whole extraction; what the extraction takes beyond the
    # other two is the top-k merge and the bookkeeping.
    split = {"read_s": 0.0, "sift_s": 0.0, "extract_s": 0.0, "keypoints_kept": 0}
    for s in data.scans:
        t0 = time.perf_counter()
        frames_of = s.read_frames(1)
        split["read_s"] += time.perf_counter() - t0
        mask = lmk.field_of_view_mask(s.read_frames(0, 16))
        t0 = time.perf_counter()
        for f in frames_of:
            split["keypoints_kept"] += len(lmk._detect(f, mask, lmk.default_k(s)))
        split["sift_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        lmk.extract_landmarks(s, workers=1)
        split["extract_s"] += time.perf_counter() - t0
    split["load_after"] = _load()
    same = all(
        results["serial_default"].keys() == results[x].keys()
        and all(np.array_equal(results["serial_default"][k], results[x][k]) for k in results[x])
        for x in ("serial_1_thread", "cluster")
    )
    files_same = all(
        (root / "serial_default" / p.name).read_bytes() == p.read_bytes()
        for x in ("serial_1_thread", "dask")
        for p in (root / x).glob("*.h5")
    )
    shutil.rmtree(root, ignore_errors=True)
    best = {k: min(r[k] for r in rounds) for k in ("serial_1_thread_s", "serial_default_s", "cluster_s")}
    return {
        "scans": scans,
        "frames": frames,
        "workers": workers,
        "repeats": repeats,
        "rounds": rounds,
        **{f"best_{k}": v for k, v in best.items()},
        "best_cluster_start_s": min(r["cluster_start_s"] for r in rounds),
        "speedup_default_over_1_thread": best["serial_1_thread_s"] / best["serial_default_s"],
        "speedup_cluster_over_1_thread": best["serial_1_thread_s"] / best["cluster_s"],
        "speedup_cluster_over_default": best["serial_default_s"] / best["cluster_s"],
        "serial_split_one_thread": split,
        "identical": bool(same and files_same),
    }


@bench
def score_cluster_setup(frames: int = 200, scans: int = 4) -> dict:
    """``scans`` copies of score_setup's scan and prediction under other keys. Not timed."""
    from tusrec.data import open_data, write_dataset_keys, write_landmarks

    score_setup(frames)
    src = BENCH_DATA / f"score{frames}"
    root = CLUSTER_DATA / f"score{frames}x{scans}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(src / "data", root / "data")
    scan = open_data(root / "data").scans[0]
    lm = scan.read_landmarks()
    names = ["LH_Par_L_DtP", "LH_Par_C_DtP", "LH_Par_S_DtP", "LH_Per_L_DtP"][:scans]
    (root / "pred").mkdir(parents=True)
    for name in names:
        for part in ("frames", "transfs"):
            target = root / "data" / part / "090" / f"{name}.h5"
            if not target.exists():
                shutil.copyfile(root / "data" / part / "090" / f"{scan.name}.h5", target)
        shutil.copyfile(next((src / "pred").glob("*.h5")), root / "pred" / f"sub090__{name}.h5")
    write_landmarks(root / "data" / "landmark" / "landmark_090.h5", {n: lm for n in names})
    write_dataset_keys(root / "data", [f"sub090__{n}" for n in names])
    shutil.rmtree(src, ignore_errors=True)
    return {
        "frames": frames,
        "scans": scans,
        "prediction_GB": scans * (root / "pred" / f"sub090__{names[0]}.h5").stat().st_size / 1e9,
    }


def _read_raw(files) -> float:
    """Seconds to read ``files`` end to end, 64 MiB at a time, unbuffered."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


@bench
def score_cluster(frames: int = 200, scans: int = 4, workers: int = 2, repeats: int = 3) -> dict:
    """`evaluate score` of the same ``scans`` dense prediction files against the raw cold
    read of the same files, side by side in each of ``repeats`` rounds (best kept, load
    noted): serial with the read-ahead (the default), serial without it
    (``ScoreLimits(readahead_mb=0)``, what the scorer did before), serial from a warm page
    cache (no disk at all: the compute's own bound), and local:2 (cluster start given
    apart). Every cold case starts from an empty page cache."""
    from tusrec.data import open_data
    from tusrec.scoring import ScoreLimits
    from tusrec.scoring.score import score_predictions

    root = CLUSTER_DATA / f"score{frames}x{scans}"
    files = sorted((root / "pred").glob("*.h5"))
    size = sum(p.stat().st_size for p in files)
    data = open_data(root / "data")
    cold = True
    rounds, tables = [], {}

    def timed(label, limits=None, client=None, drop=True):
        nonlocal cold
        if drop:
            cold = _drop_page_cache() and cold
        out = root / label
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        tables[label] = score_predictions(root / "pred", data, out, limits=limits, client=client)
        return time.perf_counter() - t0

    for _ in range(repeats):
        r = {"load_before": _load()}
        cold = _drop_page_cache() and cold
        r["raw_s"] = _read_raw(files)
        r["serial_s"] = timed("serial")
        r["serial_no_readahead_s"] = timed("no-readahead", ScoreLimits(readahead_mb=0))
        _read_raw(files)  # into the page cache
        r["serial_warm_s"] = timed("warm", drop=False)
        local, client, start = _local_cluster(workers)
        try:
            r["cluster_s"] = timed("dask", client=client)
            r["cluster_start_s"] = start
        finally:
            client.close()
            local.close()
        cold = _drop_page_cache() and cold
        r["raw_after_s"] = _read_raw(files)
        r["load_after"] = _load()
        for k in ("serial", "serial_no_readahead", "serial_warm", "cluster"):
            r[f"ratio_{k}_to_raw"] = min(r["raw_s"], r["raw_after_s"]) / r[f"{k}_s"]
        rounds.append(r)
    best = {k: min(r[k] for r in rounds) for k in rounds[0] if k.endswith("_s")}
    raw = min(best["raw_s"], best["raw_after_s"])
    ref = tables["serial"]
    return {
        "frames": frames,
        "scans": scans,
        "workers": workers,
        "repeats": repeats,
        "prediction_GB": size / 1e9,
        "cold_page_cache": cold,
        "rounds": rounds,
        **{f"best_{k}": v for k, v in best.items()},
        "best_raw_read_GB_per_s": size / raw / 1e9,
        **{
            f"ratio_{k}_to_raw": raw / best[f"{k}_s"]
            for k in ("serial", "serial_no_readahead", "serial_warm", "cluster")
        },
        "identical": all(ref.equals(t) for t in tables.values()),
    }


def child(name: str, kwargs: dict) -> dict:
    """Run one benchmark in a fresh interpreter; add its peak resident memory."""
    code = (
        "import json, resource, sys; from benchmarks.run import BENCHES; "
        f"r = BENCHES[{name!r}](**json.loads(sys.argv[1])); "
        "r['peak_rss_MB'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print('RESULT ' + json.dumps(r))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark {name} {kwargs} failed:\n{run.stderr[-3000:]}")


PLAN = [
    ("simulate", {"frames": 200}),
    ("ground_truth", {"frames": 200}),
    ("ground_truth", {"frames": 1600}),
    ("ground_truth", {"frames": 200, "write": True}),
    ("ground_truth", {"frames": 1600, "write": True}),
    ("score_compact", {"frames": 200}),
    ("score_compact", {"frames": 1600}),
    ("landmarks", {"frames": 500}),
    ("score_setup", {"frames": 200}),
    ("score", {"frames": 200}),
    ("score_setup", {"frames": 1600}),
    ("score", {"frames": 1600}),
    ("predict_setup", {"frames": 500}),
    ("predict", {"frames": 500, "form": "transforms"}),
    ("predict", {"frames": 500}),
    ("registration", {"frames": 500}),
    ("model_interface", {"frames": 500, "repeats": 3}),
    ("predict_setup", {"frames": 200}),
    ("predict", {"frames": 200, "form": "transforms"}),
    ("predict", {"frames": 200}),
    ("predict_setup", {"frames": 1600}),
    ("predict", {"frames": 1600, "form": "transforms"}),
    ("predict", {"frames": 1600}),
    ("registration", {"frames": 1600}),
    ("rank", {"teams": 20, "scans": 768, "resamples": 2000}),
    ("demo", {}),
    ("cluster_scaling_setup", {"scans": 16, "sleep_s": 5.0}),
    ("cluster_scaling", {"workers": [0, 1, 2, 4], "scans": 16, "sleep_s": 5.0}),
    ("landmarks_cluster", {"scans": 4, "frames": 80, "workers": 2, "repeats": 3}),
    ("score_cluster_setup", {"frames": 200, "scans": 4}),
    ("score_cluster", {"frames": 200, "scans": 4, "workers": 2, "repeats": 3}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    args = parser.parse_args()
    results = []
    for name, kwargs in PLAN:
        setup_of = name.removesuffix("_setup") if name.endswith("_setup") else None
        if args.only and name not in args.only and setup_of not in args.only:
            continue
        print(f"bench {name} {kwargs} ...", flush=True)
        r = {"bench": name, "args": kwargs, **child(name, kwargs)}
        print("   ", json.dumps(r), flush=True)
        results.append(r)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged = {(r["bench"], json.dumps(r["args"], sort_keys=True)): r for r in previous.get("results", [])}
    merged.update({(r["bench"], json.dumps(r["args"], sort_keys=True)): r for r in results})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": list(merged.values())}, indent=2) + "\n")
    shutil.rmtree(BENCH_DATA, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
