"""Write simulated scans as a TUS-REC data folder (training or validation/test layout)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tusrec.data import (
    EVAL,
    KEYS_FILE,
    TRAIN,
    open_data,
    open_h5,
    scan_key,
    write_data_calibration,
    write_dataset_keys,
    write_scan,
)
from tusrec.geometry import Calibration, default_calibration


@dataclass(frozen=True)
class FrameCount:
    """Frames per scan: a fixed number, or a range (inclusive) drawn per scan."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> FrameCount:
        """'300' -> 300 frames every scan; '250-350' -> drawn per scan in that range."""
        lo, _, hi = str(text).partition("-")
        low, high = int(lo), int(hi or lo)
        if low < 2 or high < low:
            raise ValueError(f"frame count {text!r}: need 2 <= MIN <= MAX")
        return cls(low, high)

    def for_scan(self, seed: int, subject: int, name: str) -> int:
        if self.low == self.high:
            return self.low
        # Stable across runs and processes (unlike hash()), and over the whole name.
        salt = zlib.crc32(name.encode())
        rng = np.random.default_rng([seed, subject, salt, 7])
        return int(rng.integers(self.low, self.high + 1))


def landmark_folder(protocol: str, layout: str) -> str:
    """The landmark folder the real data uses: 2024's val/test spells it 'landmark'."""
    return "landmark" if (layout == EVAL and protocol == "2024") else "landmarks"


def simulate_dataset(
    root: str | Path,
    subjects: list[int],
    protocol: str = "2024",
    layout: str = EVAL,
    frames: FrameCount | int | str = 300,
    names: list[str] | None = None,
    seed: int = 0,
    calib: Calibration | None = None,
    image_size: tuple[int, int] = (480, 640),
    landmarks: bool = True,
    k: int | None = None,
    client=None,
    ground_truth: bool = True,
) -> list[str]:
    """Simulate scans into ``root`` in the real layout; returns the keys written.

    subjects: subject numbers (0..999). names: scan names (default: every name of the
    protocol). Scans already complete on disk are kept, so a rerun finishes what an
    interrupted run left. With ``landmarks``, the SIFT landmark files are made by the
    same code as the ``landmarks`` command. With a Dask ``client`` each scan is one unit
    on the cluster (``simulate_unit``; the landmarks too): a scan depends only on (seed,
    subject, name), so the files are the same wherever it is made. ``ground_truth`` False
    (EVAL only): the test layout as a team's container sees it, frames/ without transfs/.
    Landmarks that cannot be found for some scans raise tusrec.landmarks.LandmarksError
    (its ``keys``: every scan written) after the others are written.
    """
    from tusrec.landmarks import LandmarksError, write_data_landmarks
    from tusrec.simulate import scan_names, simulate_scan

    if layout not in (TRAIN, EVAL):
        raise ValueError(f"layout must be {TRAIN!r} or {EVAL!r}, got {layout!r}")
    if not ground_truth and layout != EVAL:
        raise ValueError("only the validation/test layout can withhold the ground truth")
    root = Path(root)
    calib = calib or default_calibration()
    frames = frames if isinstance(frames, FrameCount) else FrameCount.parse(frames)
    names = names or scan_names(protocol)
    write_data_calibration(root, calib)
    if landmarks:
        # made before the landmark files so that they go under the spelling of the real data
        # ('landmark' in 2024's val/test layout); without landmarks no empty folder is left
        (root / landmark_folder(protocol, layout)).mkdir(parents=True, exist_ok=True)

    jobs = [(s, n) for s in subjects for n in names]
    keys = [scan_key(s, n) for s, n in jobs]
    counts = [frames.for_scan(seed, s, n) for s, n in jobs]
    todo = [
        (subject, name, n_frames)
        for (subject, name), n_frames in zip(jobs, counts, strict=True)
        if not _complete(root, layout, subject, name, ground_truth)
    ]
    if client is not None:
        from tusrec.cluster import fail_if_units_failed, map_units

        units = [
            (
                scan_key(subject, name),
                (str(root), layout, subject, name, n, seed, calib, image_size, ground_truth),
            )
            for subject, name, n in todo
        ]
        done = map_units(
            client, simulate_unit, units, "simulate", total=len(jobs), done=len(jobs) - len(units)
        )
        fail_if_units_failed(done, "simulation")
    else:
        with tqdm(total=sum(counts), unit="frame", desc="simulate", disable=None) as bar:
            bar.update(sum(counts) - sum(n for _, _, n in todo))
            for subject, name, n_frames in todo:
                sim = simulate_scan(subject, name, n_frames, seed=seed, calib=calib, image_size=image_size)
                chunks = (_counted(c, bar) for c in sim.frame_chunks())
                write_scan(root, layout, subject, name, chunks, sim.tforms)
                if not ground_truth:
                    _withhold_tforms(root, subject, name)
    if not ground_truth:
        _remove_empty_folders(root / "transfs")
    if layout == EVAL:
        # Scans simulated into this folder earlier (another protocol, say) stay listed.
        earlier = []
        if (Path(root) / KEYS_FILE).is_file():
            with open_h5(Path(root) / KEYS_FILE) as f:
                earlier = list(f.keys())
        write_dataset_keys(root, [*earlier, *keys])
    if landmarks:
        try:
            write_data_landmarks(open_data(root), k=k, keys=keys, client=client)
        except LandmarksError as err:
            raise LandmarksError(err.failed, err.made, keys) from None
    return keys


def simulate_unit(
    root: str,
    layout: str,
    subject: int,
    name: str,
    n_frames: int,
    seed: int,
    calib: Calibration,
    image_size: tuple[int, int],
    ground_truth: bool = True,
) -> int:
    """One synthetic scan as a cluster unit, written into the data folder (``write_scan``
    writes each file under a temporary name and renames it when complete); returns
    n_frames."""
    from tusrec.simulate import simulate_scan

    sim = simulate_scan(subject, name, n_frames, seed=seed, calib=calib, image_size=image_size)
    write_scan(root, layout, subject, name, sim.frame_chunks(), sim.tforms)
    if not ground_truth:
        _withhold_tforms(Path(root), subject, name)
    return n_frames


def _withhold_tforms(root: Path, subject: int, name: str) -> None:
    """The test layout: write_scan writes the validation layout's transfs/ file with the
    frames (kilobytes); it is removed at once, as the organisers hold it back."""
    (root / "transfs" / f"{subject:03d}" / f"{name}.h5").unlink(missing_ok=True)


def _remove_empty_folders(top: Path) -> None:
    """Remove ``top`` and its subfolders if they hold no file (a folder of earlier scans
    with their ground truth stays)."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(top.iterdir()):
        top.rmdir()


def _counted(chunk: np.ndarray, bar: tqdm) -> np.ndarray:
    bar.update(len(chunk))
    return chunk


def _complete(root: Path, layout: str, subject: int, name: str, ground_truth: bool = True) -> bool:
    sub = f"{subject:03d}"
    if layout == TRAIN:
        return (root / "frames_transfs" / sub / f"{name}.h5").is_file()
    return (root / "frames" / sub / f"{name}.h5").is_file() and (
        not ground_truth or (root / "transfs" / sub / f"{name}.h5").is_file()
    )
