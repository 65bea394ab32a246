"""Scan -> transforms -> DDFs under a time limit: the submission's predictor.

Per scan: read the frames in chunks and preprocess them (small: 64 x 80 by default),
run as many ensemble members as fit in the time left, combine them, optionally take the
in-plane motion from registration of the native frames (``in_plane``,
tusrec.model.registration), chain the combined local transforms into global ones, and
write the predictions file
(tusrec.ddf.write_predictions), which appears under its name only when complete: in the
compact form the transforms and GL/LL (kilobytes), in the dense form also GP/LP,
streamed in frame chunks (gigabytes).

The time limit is a guarantee as far as the predictor controls it: the deadline for the
network is the scan's limit minus the time the output will take to write (estimated from
the frame count and the form), every member is checked against it between windows, and
when not even one member can finish, the identity motion (a valid, scorable prediction)
is written instead and the manifest says so. A scan that still ends past its limit (slow
reading, a slow disk) is marked in the manifest (column overrun_s).
"""

from __future__ import annotations

import gc
import hashlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tusrec.data import (
    DDF_FORM,
    EXPECTED_ERROR_SOURCES,
    PREDICTION_FORMS,
    PREDICTION_PIXEL_SETS,
    PREDICTION_TRANSFORM_SETS,
    PredictionWriter,
    Scan,
    TusrecDataError,
    h5_has_dataset,
    open_h5,
    read_manifest,
    usable_cores,
    write_manifest,
)
from tusrec.ddf import DEFAULT_CHUNK, write_predictions
from tusrec.geometry import Calibration, compose_local
from tusrec.model import registration
from tusrec.model.ensemble import (
    Member,
    MemberOutput,
    OutOfTimeError,
    combine,
    decorrelation_steps,
    members_outputs,
    read_scan_input,
)
from tusrec.model.error_model import ErrorModel
from tusrec.model.inputs import scan_code
from tusrec.model.registration import (
    DEFAULT_IN_PLANE,
    IN_PLANE_SOURCES,
    SquareFrames,
    keeps_sweep_tx,
    pair_decorrelation,
    register_in_plane,
    resample_square,
    square_frames,
    square_grid,
    square_size,
    with_in_plane,
)
from tusrec.predict.interface import (
    DensePrediction,
    Model,
    ModelError,
    ModelOutputError,
    ModelThread,
    ModelTimeoutError,
    RigidPrediction,
    check_transforms,
    describe_exception,
)

DEFAULT_TIME_LIMIT_S = 120.0
# GP+LP written per second at 480 x 640, measured on a 2-core CPU with a plain disk
# (benchmarks: 49 frames/s at 1,600 frames); the reserve uses it with a safety factor.
DDF_WRITE_FRAMES_PER_S = 40.0
RESERVE_FACTOR = 1.5
RESERVE_MARGIN_S = 2.0
# Registration seconds a frame pair on one core at 480 x 640: 4.9-5.5 ms of ECC (its
# false-optimum check included), measured on this kit's 2-core CPU (make bench,
# "registration"), and 0.35-0.5 ms of the pair's decorrelation for the error model (the
# same bench); the members' deadline keeps this, with the reserve's safety factor, for the
# registration that follows them. The resampling (0.9-1.0 ms a frame) is not in it: it
# happens while the scan is read for the members (Predictor.read_inputs).
REGISTRATION_S_PER_PAIR = 0.0060
# A model's call still running this long past its scan's limit (at least; hang_grace_s) is
# given up on: status 'timeout', and the run goes on.
HANG_GRACE_MIN_S = 5.0


def pick_device(device: str | None = None) -> torch.device:
    """'auto' or None -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(name: str) -> torch.device:
    """``--device`` as given -> torch.device, or ValueError with one line naming what is
    there: 'auto', 'cpu', 'cuda' or 'cuda:N' of a CUDA device this torch can use."""
    if name in (None, "auto"):
        return pick_device(name)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) was built without CUDA"
        else:
            why = f"torch (CUDA {torch.version.cuda}) sees no GPU here"
        raise ValueError(f"--device {name}: {why}; the only device here is cpu (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        there = ", ".join(f"cuda:{i}" for i in range(count))
        raise ValueError(f"--device {name}: there are {count} CUDA device(s) here: {there} (and cpu)")
    return device


def ddf_reserve_s(n_frames: int, image_size: tuple[int, int], form: str = DDF_FORM) -> float:
    """Seconds to keep for writing a scan's predictions file (generous estimate).

    Dense DDFs take seconds per hundred frames; the compact form is a few kilobytes, so
    only the margin is kept.
    """
    if form != DDF_FORM:
        return RESERVE_MARGIN_S
    pixels = image_size[0] * image_size[1] / (480 * 640)
    return RESERVE_FACTOR * n_frames * pixels / DDF_WRITE_FRAMES_PER_S + RESERVE_MARGIN_S


def registration_reserve_s(n_frames: int, image_size: tuple[int, int], workers: int) -> float:
    """Seconds to keep after the members for registering a scan's frame pairs."""
    pixels = image_size[0] * image_size[1] / (480 * 640)
    return RESERVE_FACTOR * max(n_frames - 1, 0) * pixels * REGISTRATION_S_PER_PAIR / max(workers, 1)


@dataclass
class ScanPrediction:
    """What the network part produced for one scan."""

    local: np.ndarray  # (N-1, 4, 4) float64 T(i->i-1)
    uncertainty: np.ndarray | None  # (N-1,) rad^2, None for the fallback
    translation_spread_mm: np.ndarray | None
    members_used: int
    fallback: str  # '' or why the identity was used
    # (N-1,) mm: the members' mean expected error (ModelConfig.error_head), else None
    expected_error_mm: np.ndarray | None = None


class Predictor(Model):
    """An ensemble and the rules for running it under a time limit: the shipped model, one
    implementation of the kit's model interface (tusrec.predict.interface.Model)."""

    def __init__(
        self,
        members: list[Member],
        device: str | None = None,
        time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        translation: str = "mean",
        chunk: int = 64,
        batched: bool | None = None,
        form: str = DDF_FORM,
        workers: int | None = None,
        in_plane: str = DEFAULT_IN_PLANE,
        error_model: ErrorModel | None = None,
    ):
        """``error_model``: the ensemble's expected error from the registration residual
        (tusrec.model.error_model), used when it was fitted for exactly these members and
        this in-plane source; otherwise the expected error is the members' error heads' (if
        any)."""
        if not members:
            raise ValueError("a predictor needs at least one ensemble member")
        if form not in PREDICTION_FORMS:
            raise ValueError(f"prediction form {form!r}; expected one of {PREDICTION_FORMS}")
        if in_plane not in IN_PLANE_SOURCES:
            raise ValueError(f"in-plane source {in_plane!r}; expected one of {IN_PLANE_SOURCES}")
        self.form = form
        self.in_plane = in_plane
        self.device = pick_device(device)
        self.members = [Member(m.name, m.net.to(self.device).eval(), m.info) for m in members]
        self.time_limit_s = time_limit_s
        self.translation = translation
        self.chunk = chunk
        # Mixed precision only where it pays (GPU); the transforms are float64 regardless.
        self.autocast = self.device.type == "cuda"
        # One vmapped pass for several members pays on a GPU (untested here); on the CPU
        # vmap loops over the attention kernels and was measured 4x slower than one by one.
        self.batched = self.device.type == "cuda" if batched is None else batched
        # On the CPU, members run side by side, one core each (torch's intra-op threads
        # set to 1 meanwhile), and the scan is read by as many threads: the network's
        # small convolutions scale poorly over threads, members not at all. Measured on 2
        # cores, see the README; the transforms are the same, bit for bit.
        if workers is None:
            workers = 1 if self.device.type != "cpu" or self.batched else usable_cores()
        self.workers = max(1, workers)
        serves = error_model is not None and error_model.serves([m.info for m in self.members], in_plane)
        self.error_model = error_model if serves else None
        self._thread: ModelThread | None = None

    @property
    def name(self) -> str:
        return f"tusrec ensemble ({', '.join(m.name for m in self.members)})"

    @property
    def fingerprint(self) -> str:
        """What the predictions depend on: the members' weight files (sha256, in order),
        the translation rule, the form, (when not the network's) the in-plane source and the
        error model in use; written into every prediction file so that a rerun keeps only what this very
        ensemble predicted (16 hex digits)."""
        parts = [m.info.get("sha256", m.name) for m in self.members] + [self.translation, self.form]
        if self.in_plane != "network":
            parts.append(f"in-plane: {self.in_plane}")
        if self.error_model is not None:
            parts.append(f"error model: {self.error_model.coefficients} {self.error_model.residual_variance}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def read_preprocessed(self, scan: Scan) -> np.ndarray:
        """The scan as the members' input: (N, C, h, w) float32 (ScanInput.network_input)."""
        return self.read_inputs(scan)[0]

    def read_inputs(
        self, scan: Scan, calib: Calibration | None = None
    ) -> tuple[np.ndarray, SquareFrames | None]:
        """The members' input (read_preprocessed) and, with ``calib``, the scan's frames
        resampled for registration (registration.square_frames, the same frames bit for
        bit), from one read of the scan. Returns ((N, C, h, w) float32, SquareFrames or None)."""
        cfg = self.members[0].cfg
        m = decorrelation_steps(self.members)
        resample = (
            None if calib is None else partial(resample_square, size=square_size(scan.shape[1:], calib))
        )
        inputs = read_scan_input(
            scan, cfg.input_size, tuple(range(1, m + 1)), self.chunk, self.workers, resample
        )
        square = square_grid(inputs.also, scan.shape[1:], calib) if calib is not None else None
        return inputs.network_input(m), square

    def predict_local(
        self, frames: np.ndarray, deadline: float, code: np.ndarray | None = None
    ) -> ScanPrediction:
        """Run members until the next would not finish by ``deadline`` (perf_counter time).

        frames: (N, C, h, w) preprocessed (read_preprocessed); code: the scan name's
        inputs.scan_code (None: unknown), for members conditioned on it. With ``workers`` > 1 (the
        CPU's default) members run side by side, ``workers`` at a time; the first to
        finish sets the pace, and a member that would end past the deadline is not
        started. Otherwise the first member runs alone: its time on this scan is the pace,
        and its result is kept whatever happens next; the rest run one by one, or
        (``batched``) as many as fit as one vmapped pass.
        """
        if self.workers > 1 and not self.batched and len(self.members) > 1:
            results, stopped = self._members_side_by_side(frames, deadline, code)
        else:
            results, stopped = self._members_in_turn(frames, deadline, code)
        if not results:
            identity = np.tile(np.eye(4), (len(frames) - 1, 1, 1))
            why = f"fallback: identity motion, no member finished within the time limit ({stopped})"
            return ScanPrediction(identity, None, None, 0, why)
        combined = combine(
            [r.local for r in results], self.translation, [r.expected_error_mm for r in results]
        )
        return ScanPrediction(
            combined.local,
            combined.rotation_disagreement,
            combined.translation_spread_mm,
            len(results),
            stopped,
            combined.expected_error_mm,
        )

    def _members_side_by_side(
        self, frames: np.ndarray, deadline: float, code: np.ndarray | None
    ) -> tuple[list[MemberOutput], str]:
        """Members in ``workers`` threads, one intra-op thread each. A member starts only
        if the pace (the first finished member's time) says it ends by ``deadline``; each
        checks the deadline between windows. Returns the finished members' transforms in
        member order (so combine() sees what the one-by-one path gives) and why any
        member is missing ('' if none)."""
        pace: list[float] = []  # the first finished member's seconds
        lock = threading.Lock()

        def run(member: Member):
            begin = time.perf_counter()
            with lock:
                if begin > deadline or (pace and begin + pace[0] > deadline):
                    return "skipped"
            try:
                out = members_outputs([member], frames, self.device, deadline, self.autocast, code)[0]
            except OutOfTimeError as err:
                return err
            with lock:
                if not pace:
                    pace.append(time.perf_counter() - begin)
            return out

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                outcomes = list(pool.map(run, self.members))
        finally:
            torch.set_num_threads(threads)
        results = [o for o in outcomes if isinstance(o, MemberOutput)]
        notes = [str(o) for o in outcomes if isinstance(o, OutOfTimeError)]
        skipped = sum(1 for o in outcomes if isinstance(o, str))
        if skipped:
            notes.append(f"{skipped} member(s) skipped for time")
        return results, "; ".join(notes)

    def _members_in_turn(
        self, frames: np.ndarray, deadline: float, code: np.ndarray | None
    ) -> tuple[list[MemberOutput], str]:
        """The first member alone, then the rest one by one or (``batched``) as one pass."""
        results: list[MemberOutput] = []
        stopped = ""
        start = time.perf_counter()
        try:
            results += members_outputs(self.members[:1], frames, self.device, deadline, self.autocast, code)
        except OutOfTimeError as err:
            stopped = str(err)
        pace = time.perf_counter() - start
        rest = self.members[1:] if results else []
        if self.batched and rest:
            fit = min(len(rest), int((deadline - time.perf_counter()) / pace))
            if fit < len(rest):
                stopped = f"{len(rest) - fit} member(s) skipped for time"
            if fit > 0:
                try:
                    results += members_outputs(rest[:fit], frames, self.device, deadline, self.autocast, code)
                except OutOfTimeError as err:
                    stopped = str(err)
        else:
            for k, member in enumerate(rest):
                if time.perf_counter() + pace > deadline:
                    stopped = f"{len(rest) - k} member(s) skipped for time"
                    break
                try:
                    results += members_outputs([member], frames, self.device, deadline, self.autocast, code)
                except OutOfTimeError as err:
                    stopped = str(err)
                    break
        return results, stopped

    def register(
        self,
        scan: Scan,
        calib: Calibration,
        local: np.ndarray,
        deadline: float,
        decorrelation: bool = False,
        square: SquareFrames | None = None,
    ) -> tuple[np.ndarray, str, np.ndarray | None]:
        """``local`` (N-1, 4, 4) with its in-plane part from registration (started from it)
        where a pair registered by ``deadline``; a note on the pairs that did not; and with
        ``decorrelation``, each pair's decorrelation before and after the registered motion
        (registration.pair_decorrelation, (N-1, 2); None past the deadline or without).
        ``square``: the scan's square frames if read already (read_inputs), else read here."""
        if square is None:
            square = square_frames((block for _, block in scan.iter_frames()), calib)
        fitted, registered = register_in_plane(square, local, deadline, self.workers)
        missed = int((~registered).sum())
        notes = []
        if missed:
            why = (
                "the time limit"
                if time.perf_counter() > deadline
                else (
                    "no convergence, or a false optimum: less alike than the network's estimate, "
                    f"or more than {registration.REGISTRATION_MAX_CORRECTION_MM:g} mm from it"
                )
            )
            notes.append(
                f"in-plane registration: {missed} of {len(registered)} frame pairs kept the "
                f"network's estimate ({why})"
            )
        residual = None
        if decorrelation:
            if time.perf_counter() < deadline:
                residual = pair_decorrelation(square, fitted, self.workers)
            else:
                notes.append("no time left for the error model: expected error from the members")
        registered_local = with_in_plane(local, fitted, keeps_sweep_tx(self.in_plane, scan.name))
        return registered_local, "; ".join(notes), residual

    def load(self, device=None) -> None:
        """Model.load: the members were put on ``self.device`` when the predictor was made."""

    def predict(
        self,
        scan: Scan,
        calib: Calibration,
        deadline: float,
        landmarks: np.ndarray | None = None,
        calib_path: Path | None = None,
    ) -> RigidPrediction:
        """Model.predict: the scan's combined local transforms, the members run until
        ``deadline`` (time.perf_counter(); the scan's limit less the writing's reserve),
        with the in-plane registration and the expected error when asked, and what the
        file and the manifest say about them."""
        t0 = time.perf_counter()
        n, h, w = scan.shape
        registering = self.in_plane != "network"
        reserve = registration_reserve_s(n, (h, w), self.workers) if registering else 0.0
        frames, square = self.read_inputs(scan, calib if registering else None)
        t_read = time.perf_counter()
        pred = self.predict_local(frames, deadline - reserve, scan_code(scan.name))
        t_network = time.perf_counter()
        columns = {"read_s": t_read - t0, "network_s": t_network - t_read}
        notes = [pred.fallback] if pred.fallback else []
        expected_source = EXPECTED_ERROR_SOURCES[1]  # the members' heads, unless the model serves
        if registering:
            with_model = self.error_model is not None and pred.uncertainty is not None
            local, note, residual = self.register(scan, calib, pred.local, deadline, with_model, square)
            pred.local = local
            if residual is not None:
                pred.expected_error_mm = self.error_model.expected_error_mm(residual, scan.name)
                expected_source = EXPECTED_ERROR_SOURCES[0]
            columns["registration_s"] = time.perf_counter() - t_network
            if note:
                notes.append(note)
        extras = {}
        if pred.uncertainty is not None:
            extras = {
                "uncertainty": pred.uncertainty,
                "uncertainty_translation_mm": pred.translation_spread_mm,
            }
            if pred.expected_error_mm is not None:
                extras["expected_error_mm"] = pred.expected_error_mm
        attrs = {"members_used": pred.members_used, "in_plane": self.in_plane}
        if "expected_error_mm" in extras:
            attrs["expected_error_source"] = expected_source
        columns["members"] = pred.members_used
        return RigidPrediction(pred.local, extras, attrs, notes, columns)

    def predict_scan(self, scan: Scan, calib: Calibration, out_path: Path) -> dict:
        """Predict one scan into ``out_path`` under this predictor's time limit and form
        (run_scan); returns its manifest row."""
        if self._thread is None:
            self._thread = ModelThread()
        return run_scan(self, scan, calib, out_path, self.time_limit_s, self.device, self._thread)


def hang_grace_s(time_limit_s: float) -> float:
    """Seconds past a scan's limit that the kit still waits for a model's call: a call that
    returns within them is kept (its overrun marked), one that does not is given up on."""
    return max(time_limit_s, HANG_GRACE_MIN_S)


def release_device_memory(device: torch.device, collect: bool = False) -> None:
    """Between scans: hand the memory a scan's tensors held back to the GPU (torch's caching
    allocator keeps it otherwise). ``collect``: first collect reference cycles, which an
    exception's traceback makes (its frames hold the failed call's tensors): after a scan
    that failed (a full collection costs 0.2 s here, too much for every scan). Nothing to
    do on the CPU (numpy and torch return freed memory to the allocator at once)."""
    if torch.device(device).type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


def run_scan(
    model: Model,
    scan: Scan,
    calib: Calibration,
    out_path: Path,
    time_limit_s: float,
    device: torch.device,
    thread: ModelThread,
    calib_path: Path | None = None,
) -> dict:
    """Predict one scan with ``model`` (any Model: the shipped ensemble or a team's) into
    ``out_path``; returns its manifest row. What the kit guarantees around the model:

    - its call runs on ``thread`` and is given up on ``hang_grace_s`` past the scan's limit
      (status 'timeout'; the call cannot be stopped, ModelThread);
    - whatever it raises or returns wrong (type, shape, dtype, NaN, non-homogeneous rows)
      costs this scan only: status 'failed' and a message naming what was wrong;
    - the file appears only when complete (tusrec.data.PredictionWriter), in ``model.form``;
    - the scan's time (read, model, check, write) is measured: ``overrun_s`` and a note
      when past ``time_limit_s``;
    - GPU memory is released after the scan (release_device_memory); on cuda the manifest
      gets the scan's peak (gpu_peak_MB).
    """
    row = _run_scan(model, scan, calib, out_path, time_limit_s, torch.device(device), thread, calib_path)
    release_device_memory(device, row["status"] != "ok")  # after _run_scan: its arrays are gone
    return row


def _run_scan(model, scan, calib, out_path, time_limit_s, device, thread, calib_path) -> dict:
    t0 = time.perf_counter()
    row = {"key": scan.key, "frames": math.nan, "status": "ok", "seconds": math.nan}
    row.update(device=str(device), message="")
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    notes: list[str] = []
    try:
        n, h, w = scan.shape
        row["frames"] = n
        landmarks = scan.read_landmarks() if scan.has_landmarks else None
        reserve = ddf_reserve_s(n, (h, w), model.form)
        deadline = t0 + time_limit_s - reserve
        if deadline <= t0:
            notes.append(
                f"the time limit ({time_limit_s:g} s) leaves the model no time: {reserve:.1f} s of it "
                "is kept for writing this scan's predictions"
            )
        job = partial(model.predict, scan, calib, deadline, landmarks, calib_path)
        pred = thread.call(job, t0 + time_limit_s + hang_grace_s(time_limit_s))
        row.update(pred.columns)
        notes += pred.notes
        attrs = {"model": model.name, "model_fingerprint": model.fingerprint, "device": str(device)}
        t_write = time.perf_counter()
        if isinstance(pred, RigidPrediction):
            local = check_transforms(pred.local, n)
            if landmarks is None:
                notes.append("no landmarks for this scan: GL/LL not written")
            write_predictions(
                out_path,
                compose_local(local),
                local,
                calib,
                (h, w),
                landmarks,
                attrs={**attrs, **pred.attrs},
                extras=pred.extras,
                started_at=t0,
                form=model.form,
            )
        elif isinstance(pred, DensePrediction):
            if model.form != DDF_FORM:  # its files would never count as complete
                raise ModelOutputError(f"the model returned dense DDFs but writes the {model.form} form")
            if landmarks is None:
                notes.append("no landmarks for this scan: GL/LL not written")
            write_dense(out_path, pred, (h, w), landmarks is not None, attrs, t0)
        else:
            raise ModelOutputError(f"the model returned a {type(pred).__name__}")
        row["write_s"] = time.perf_counter() - t_write
        row["message"] = "; ".join(notes)
    except ModelTimeoutError:
        waited = time.perf_counter() - t0
        row.update(
            status="timeout",
            message=f"the model did not return within {waited:.1f} s (time limit {time_limit_s:g} s "
            f"+ {hang_grace_s(time_limit_s):g} s of grace); the run went on without it",
        )
    except ModelError as err:
        row.update(status="failed", message=str(err))
    except (TusrecDataError, OSError, ValueError) as err:
        row.update(status="failed", message=str(err))
    except Exception as err:
        row.update(status="failed", message=describe_exception(err))
    row["seconds"] = time.perf_counter() - t0
    if on_cuda:
        row["gpu_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    # The file is valid and kept, but a runner that enforces the limit from outside
    # would have stopped this scan: say so rather than report a plain 'ok'.
    row["overrun_s"] = max(0.0, row["seconds"] - time_limit_s)
    if row["overrun_s"] > 0:
        note = f"over the time limit: {row['seconds']:.1f} s of {time_limit_s:g} s"
        row["message"] = "; ".join(m for m in (row["message"], note) if m)
    return row


def write_dense(
    out_path: Path,
    pred: DensePrediction,
    image_size: tuple[int, int],
    with_landmarks: bool,
    attrs: dict,
    started_at: float,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Write a template model's GP/GL/LP/LL (checked: check_ddfs) in the dense form, GP/LP
    a frame chunk at a time, each chunk checked for NaN/infinity first (ModelOutputError
    naming the first such frame; the file then never appears)."""
    n = len(pred.GP) + 1
    with PredictionWriter(out_path, n, image_size, attrs, started_at, DDF_FORM) as out:
        for start in range(0, n - 1, chunk):
            gp, lp = pred.GP[start : start + chunk], pred.LP[start : start + chunk]
            for arr, name in ((gp, "GP"), (lp, "LP")):
                finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
                if not finite.all():
                    frame = start + int(np.flatnonzero(~finite)[0])
                    raise ModelOutputError(
                        f"{name} is not finite (NaN or infinity) at row {frame} (frame {frame + 1})"
                    )
            out.write_pixels(start, gp, lp)
        if with_landmarks:
            out.write_landmarks(pred.GL, pred.LL)


def prediction_complete(path: Path, scan: Scan, form: str = DDF_FORM, fingerprint: str | None = None) -> bool:
    """Whether ``path`` is a finished prediction of ``scan`` in ``form`` (a rerun keeps it).

    Files only ever appear under their final name when complete, but a file from another
    run or version is checked anyway: it must open and have the datasets of the form
    (GP/LP, or both transform sets) at this scan's shape. A file of the other form is
    redone, so that a folder is never a mix of what two commands asked for; with
    ``fingerprint`` (Predictor.fingerprint), so is a file another ensemble (other weights,
    members or translation rule) or an older version without the attribute wrote.
    """
    try:
        n, h, w = scan.shape  # an unreadable scan has no complete prediction
        shapes = (
            {k: (n - 1, 3, h * w) for k in PREDICTION_PIXEL_SETS}
            if form == DDF_FORM
            else {k: (n - 1, 4, 4) for k in PREDICTION_TRANSFORM_SETS}
        )
        if not all(h5_has_dataset(path, k) for k in shapes):
            return False
        with open_h5(path) as f:
            declared = f.attrs.get("form", DDF_FORM)
            declared = declared.decode() if isinstance(declared, bytes) else str(declared)
            if fingerprint is not None:
                made_by = f.attrs.get("model_fingerprint", b"")
                made_by = made_by.decode() if isinstance(made_by, bytes) else str(made_by)
                if made_by != fingerprint:
                    return False
            return declared == form and all(f[k].shape == shape for k, shape in shapes.items())
    except (TusrecDataError, OSError):
        return False


def previous_rows(output: Path) -> dict[str, dict]:
    """Manifest rows of an earlier run, by key ({} if none or unreadable)."""
    try:
        table = read_manifest(output)
    except TusrecDataError:
        return {}
    if table is None:
        return {}
    return {k: {"key": k, **r} for k, r in table.to_dict("index").items()}


def remove_partial_files(output: Path) -> list[Path]:
    """Delete temporary files an interrupted run left behind (never trusted)."""
    stale = [p for p in output.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def check_writable(output: Path) -> None:
    """Fail early, with the folder named, when predictions cannot be written there."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".tusrec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TusrecDataError(f"{output}: output folder is not writable ({err.strerror})") from None


def write_rows(output: Path, rows: dict[str, dict]) -> None:
    write_manifest(output, [rows[k] for k in sorted(rows)])
