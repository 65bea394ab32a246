"""Shared builders for the tests: small synthetic TUS-REC data folders (docs/conventions.md section 1).

Everything is written with the project's own writers (tusrec.data.write_*), so a folder made
here is what the project itself would produce. Test files get the builders through fixtures
(``synth``, ``dataset_factory``) rather than by importing this module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tusrec.data import (
    EVAL,
    SCAN_NAMES_2024,
    SCAN_NAMES_2025,
    TRAIN,
    scan_key,
    write_data_calibration,
    write_dataset_keys,
    write_landmarks,
    write_scan,
)
from tusrec.geometry import Calibration, default_calibration, pose6_to_matrix

SMALL_IMAGE = (24, 32)  # (H, W): small but not square, so H/W mix-ups show
NAMES_2024, NAMES_2025 = SCAN_NAMES_2024, SCAN_NAMES_2025


def random_tforms(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rigid tool->camera transforms (n, 4, 4) float64 from random 6-DoF poses."""
    poses = np.concatenate([rng.normal(0.0, 0.5, (n, 3)), rng.normal(0.0, 60.0, (n, 3))], axis=1)
    return pose6_to_matrix(poses)


def random_frames(rng: np.random.Generator, n: int, image_size: tuple[int, int] = SMALL_IMAGE) -> np.ndarray:
    """n random uint8 frames (n, H, W)."""
    return rng.integers(0, 256, (n, *image_size), dtype=np.uint8)


def random_landmarks(
    rng: np.random.Generator, k: int, n_frames: int, image_size: tuple[int, int] = SMALL_IMAGE
) -> np.ndarray:
    """k valid landmark rows (frame index 1..N-1, x 1..W, y 1..H), int64 (k, 3)."""
    h, w = image_size
    return np.stack(
        [
            rng.integers(1, n_frames, k),  # frame index, never 0
            rng.integers(1, w + 1, k),
            rng.integers(1, h + 1, k),
        ],
        axis=1,
    ).astype(np.int64)


def make_dataset(
    root: str | Path,
    layout: str = EVAL,
    subjects: Iterable[str | int] = ("050",),
    names: Sequence[str] = ("LH_Par_C_DtP",),
    n_frames: int = 6,
    image_size: tuple[int, int] = SMALL_IMAGE,
    landmark_dir: str = "landmarks",
    *,
    n_landmarks: int = 5,
    with_tforms: bool = True,
    with_keys: bool = True,
    calib: Calibration | None = None,
    seed: int = 0,
) -> Path:
    """Write a small valid data folder and return its root.

    layout: tusrec.data.TRAIN (frames_transfs/) or EVAL (frames/ + transfs/ +
    dataset_keys.h5). landmark_dir: 'landmark' (2024 spelling) or 'landmarks'.
    with_tforms=False drops transfs/ (the test layout); with_keys=False skips
    dataset_keys.h5. Content is random but reproducible from ``seed``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    subjects = [f"{int(s):03d}" for s in subjects]
    keys = []
    for subject in subjects:
        lms = {}
        for name in names:
            write_scan(
                root,
                layout,
                subject,
                name,
                random_frames(rng, n_frames, image_size),
                random_tforms(rng, n_frames),
            )
            lms[name] = random_landmarks(rng, n_landmarks, n_frames, image_size)
            keys.append(scan_key(subject, name))
        write_landmarks(root / landmark_dir / f"landmark_{subject}.h5", lms)
    write_data_calibration(root, calib if calib is not None else default_calibration())
    if layout == EVAL:
        if with_keys:
            write_dataset_keys(root, keys)
        if not with_tforms:
            shutil.rmtree(root / "transfs", ignore_errors=True)
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def synth() -> SimpleNamespace:
    """The builders of this module, for test files."""
    return SimpleNamespace(
        make_dataset=make_dataset,
        random_tforms=random_tforms,
        random_frames=random_frames,
        random_landmarks=random_landmarks,
        SMALL_IMAGE=SMALL_IMAGE,
        NAMES_2024=NAMES_2024,
        NAMES_2025=NAMES_2025,
        TRAIN=TRAIN,
        EVAL=EVAL,
    )


@pytest.fixture
def dataset_factory():
    """``make_dataset`` itself (same signature)."""
    return make_dataset


@pytest.fixture
def eval_root(tmp_path) -> Path:
    """A validation-layout folder: 2 subjects x 2 2024 scans, 2024 'landmark' spelling."""
    return make_dataset(
        tmp_path / "eval",
        EVAL,
        ("050", "051"),
        ("LH_Par_C_DtP", "RH_Per_L_PtD"),
        6,
        SMALL_IMAGE,
        "landmark",
    )


@pytest.fixture
def testset_root(tmp_path) -> Path:
    """A test-layout folder (no transfs/): 1 subject x 2 2025 scans, 'landmarks' spelling."""
    return make_dataset(
        tmp_path / "test", EVAL, ("060",), NAMES_2025, 6, SMALL_IMAGE, "landmarks", with_tforms=False
    )


@pytest.fixture
def train_root(tmp_path) -> Path:
    """A training-layout folder: 2 subjects x 2 2025 scans."""
    return make_dataset(tmp_path / "train", TRAIN, ("000", "001"), NAMES_2025, 6, SMALL_IMAGE, "landmarks")


def simulated_train_root(root: Path, frames: int, names: list[str]) -> Path:
    """Simulated training data (tusrec simulate): subjects 000-002, the scans ``names``
    of ``frames`` frames each, 120 x 160 pixels, no landmarks. Returns the root."""
    from tusrec.simulate.dataset import simulate_dataset

    simulate_dataset(
        root, [0, 1, 2], layout="train", frames=frames, names=names, image_size=(120, 160), landmarks=False
    )
    return root


@pytest.fixture(scope="session")
def train_simulator():
    """simulated_train_root, for module-scoped fixtures of other simulated training sets."""
    return simulated_train_root


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory) -> Path:
    """Simulated training data: 3 subjects x 1 scan x 40 frames, 120 x 160 pixels."""
    return simulated_train_root(tmp_path_factory.mktemp("sim") / "train", 40, ["LH_Par_C_DtP"])
