"""SIFT landmarks of a scan (docs/conventions.md 1.3).

The 2024 challenge paper says the landmarks are, per scan, the keypoints with the
highest SIFT response. Here: OpenCV SIFT with its default parameters on frames 1..N-1
(frame 0 has no DDF), restricted to the field of view shrunk by a margin (the fan's
edge is a strong artificial feature), the K strongest over the whole scan, no two at
the same (frame, x, y). Coordinates are converted from OpenCV's 0-based pixel centres
to TUS-REC's 1-based pixels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tusrec.data import Scan, TusrecData, TusrecDataError, h5_has_dataset, write_landmarks

DEFAULT_K = {"2024": 20, "2025": 100}
FOV_MARGIN_PX = 10


class LandmarksError(TusrecDataError):
    """Some scans got no landmarks (the others were written): ``failed`` maps each such
    scan's key to why; ``made`` holds what this run extracted, by key; ``keys`` the scans
    a caller asked for (simulate: every scan it wrote)."""

    def __init__(self, failed: dict[str, str], made: dict[str, np.ndarray], keys: list[str] | None = None):
        self.failed, self.made, self.keys = failed, made, list(keys or [])
        first = next(iter(failed.items()))
        super().__init__(f"no landmarks for {len(failed)} scan(s), e.g. {first[0]}: {first[1]}")


def default_k(scan: Scan) -> int:
    """20 landmarks for 2024-style scans, 100 for 2025 rotation scans."""
    return DEFAULT_K.get(scan.pattern.protocol, DEFAULT_K["2024"])


def field_of_view_mask(frames: np.ndarray, margin: int = FOV_MARGIN_PX) -> np.ndarray:
    """The imaged region of a scan, shrunk by ``margin`` pixels: (H, W) uint8 0/255.

    frames: (n, H, W) uint8, a sample of the scan. Outside the fan every frame is 0.
    The background is the zero pixels connected to the image border, so dark structures
    inside the fan (an anechoic vessel) stay in the field of view.
    """
    zero = (~(frames > 0).any(axis=0)).astype(np.uint8)
    _, labels = cv2.connectedComponents(zero, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0]) | (labels > 0) & ~zero.astype(bool)
    fov = (~background).astype(np.uint8) * 255
    if margin > 0:
        fov = cv2.erode(fov, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8), borderValue=0)
    return fov


def _detect(frame: np.ndarray, mask: np.ndarray, k: int) -> list[tuple[float, float, float]]:
    """The k strongest SIFT keypoints of one frame inside ``mask``: (response, x0, y0).

    SIFT's own ``nfeatures`` is not used: OpenCV keeps the best n before applying the
    mask, which would lose keypoints inside the field of view.
    """
    keypoints = cv2.SIFT_create().detect(frame, mask)
    best = sorted(keypoints, key=lambda kp: -kp.response)[:k]
    return [(kp.response, kp.pt[0], kp.pt[1]) for kp in best]


def extract_landmarks(
    scan: Scan,
    k: int | None = None,
    chunk: int = 32,
    workers: int = 2,
    progress=None,
) -> np.ndarray:
    """The K strongest SIFT keypoints of a scan: (K, 3) int64 rows (frame index, x, y).

    Frame index is 0-based in 1..N-1; x, y are 1-based pixels. Rows are ordered by
    decreasing response. Fewer than K rows only if the scan has fewer distinct
    keypoints. ``progress`` (optional) is called with the number of frames done.
    """
    k = default_k(scan) if k is None else k
    n, h, w = scan.shape
    sample = scan.read_frames(0, min(n, 16))
    mask = field_of_view_mask(sample)
    if not mask.any():
        if field_of_view_mask(sample, margin=0).any():
            raise ValueError(
                f"{scan.frames_path}: the field of view of these {h}x{w} frames is narrower than the "
                f"{FOV_MARGIN_PX}-pixel margin kept from its edge; no landmarks can be found in it"
            )
        raise ValueError(f"{scan.frames_path}: the frames are blank; no field of view found")

    candidates: list[tuple[float, int, int, int]] = []
    # Each frame's top k suffices: the scan's top k are among the union of them.
    # OpenCV releases the GIL, and one SIFT per thread scales better than its own threads.
    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start, frames in scan.iter_frames(chunk, start=1):
                results = pool.map(lambda f: _detect(f, mask, k), frames)
                for offset, keypoints in enumerate(results):
                    for response, x, y in keypoints:
                        xi = min(max(round(x) + 1, 1), w)
                        yi = min(max(round(y) + 1, 1), h)
                        candidates.append((response, start + offset, xi, yi))
                if progress is not None:
                    progress(len(frames))
    finally:
        cv2.setNumThreads(previous_threads)

    # Strongest first; ties broken by position so the result is deterministic.
    candidates.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
    chosen: list[tuple[int, int, int]] = []
    taken: set[tuple[int, int, int]] = set()
    for _, f, x, y in candidates:
        if (f, x, y) not in taken:
            taken.add((f, x, y))
            chosen.append((f, x, y))
            if len(chosen) == k:
                break
    return np.array(chosen, dtype=np.int64).reshape(-1, 3)


def landmarks_unit(scan: Scan, k: int | None) -> np.ndarray:
    """One scan's landmarks as a cluster unit: (K, 3) int64, one SIFT thread (the Dask
    worker is the unit of parallelism)."""
    return extract_landmarks(scan, k, workers=1)


def write_data_landmarks(
    data: TusrecData,
    k: int | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    keys: list[str] | None = None,
    client=None,
    threads: int = 2,
) -> dict[str, np.ndarray]:
    """Extract landmarks for the scans of a data folder and write landmark_<sub>.h5.

    Files go to the data folder's own landmark folder, or to ``out_dir``. Scans that
    already have a landmark dataset there are skipped unless ``overwrite``; each scan's
    landmarks are written as soon as they are found, so an interrupted run resumes.
    With a Dask ``client`` each scan is one unit on the cluster (``landmarks_unit``) and
    this process writes each result as it arrives: the same function, the same arrays,
    the same files (each rewritten atomically, datasets sorted by name). threads: SIFT
    threads of the in-process path (2, the fastest on 2 cores: benchmarks/run.py
    landmarks_cluster measures 1 and 2 threads against local:2 side by side).
    Returns the landmarks extracted in this run, by scan key. A scan whose frames or
    landmark file cannot be read, or that has no field of view, gets none: the others are
    written all the same, and then LandmarksError names every such scan and why.
    """
    scans = data.select(keys)
    failed: dict[str, str] = {}

    def path_of(scan: Scan) -> Path:
        if out_dir is not None:
            return Path(out_dir) / f"landmark_{scan.subject}.h5"
        return data.landmark_path(scan.subject)

    def needed(scan: Scan) -> bool:
        if overwrite:
            return True
        try:
            return not h5_has_dataset(path_of(scan), scan.name)
        except TusrecDataError as err:  # an unreadable landmark file: never overwritten
            failed[scan.key] = f"{err} (remove it to have it made again)"
            return False

    todo = [s for s in scans if needed(s)]
    made: dict[str, np.ndarray] = {}

    def keep(scan: Scan, lm: np.ndarray) -> None:
        try:
            write_landmarks(path_of(scan), {scan.name: lm})
        except TusrecDataError as err:  # the subject's landmark file is there but unreadable
            failed[scan.key] = f"{err} (remove it to have it made again)"
            return
        made[scan.key] = lm

    if client is not None:
        from tusrec.cluster import map_units

        by_key = {s.key: s for s in todo}
        done = map_units(
            client,
            landmarks_unit,
            [(s.key, (s, k)) for s in todo],
            "landmarks",
            lambda key, lm: keep(by_key[key], lm),
            total=len(scans),
            done=len(scans) - len(todo),
        )
        failed.update(done.failed)
        made = {s.key: made[s.key] for s in todo if s.key in made}
    else:
        sizes = {}
        for scan in scans:
            try:
                sizes[scan.key] = scan.n_frames - 1
            except TusrecDataError:
                sizes[scan.key] = 0  # its failure is said when it is reached
        total = sum(sizes.values())
        with tqdm(total=total, unit="frame", desc="landmarks", disable=None) as bar:
            bar.update(total - sum(sizes[s.key] for s in todo))
            for scan in todo:
                try:
                    lm = extract_landmarks(scan, k, workers=threads, progress=bar.update)
                except (ValueError, OSError) as err:  # the scan's frames (TusrecDataError, h5py's)
                    failed[scan.key] = " ".join(str(err).split()) or type(err).__name__
                    continue
                keep(scan, lm)  # a landmark file that cannot be written stops the run (one line)
    if failed:
        raise LandmarksError(failed, made, [s.key for s in scans])
    return made
