"""A simulated freehand scan: poses up front, frames rendered lazily in chunks."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..geometry import Calibration, default_calibration
from .anatomy import anatomy_volume, arm_model
from .imaging import FanGeometry, Renderer, fan_geometry
from .speckle import speckle_tiles, tile_poses
from .trajectory import parse_name, probe_poses, world_from_arm

RENDER_THREADS = 2  # frames rendered concurrently (OpenCV and numpy release the GIL)


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across processes, unlike hash()


class SimulatedScan:
    """One simulated scan of a subject.

    Attributes:
        name, subject: the scan name (e.g. 'LH_Par_C_DtP') and subject number.
        tforms: (N, 4, 4) float32, tracker tool -> camera (world) per frame, so that
            tforms[i] @ calib.T_rotation = image_to_world[i] (up to float32 rounding).
        image_to_world: (N, 4, 4) float64, image mm of frame i -> world mm (ground truth).
        fov_mask: (H, W) bool, the curvilinear field of view (pixels outside are 0).
        arm_from_image: (N, 4, 4) float64, image mm -> arm-anatomy mm (see anatomy.py).
    Frames (uint8, (H, W)) are rendered on demand, so memory does not grow with N.
    """

    def __init__(
        self,
        subject: int,
        name: str,
        n_frames: int,
        seed: int,
        calib: Calibration,
        image_size: tuple[int, int],
    ) -> None:
        parts = parse_name(name)
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        self.name, self.subject, self.seed = name, int(subject), int(seed)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.calib = calib
        sx, sy = calib.pixel_spacing_mm
        self.fan: FanGeometry = fan_geometry(self.image_size[0], self.image_size[1], sx, sy)
        key = _name_key(name)
        model = arm_model(self.seed, self.subject)
        traj_rng = np.random.default_rng([self.seed, self.subject, key, 1])
        self.arm_from_image = probe_poses(model, name, int(n_frames), traj_rng, self.fan.face_centre)
        self.world_from_arm = world_from_arm(self.seed, self.subject, parts["arm"], traj_rng)
        self.image_to_world = self.world_from_arm @ self.arm_from_image
        self.tforms = (self.image_to_world @ np.linalg.inv(calib.T_rotation)).astype(np.float32)
        self.fov_mask = self.fan.fov.copy()
        self._mirror = parts["arm"] == "LH"
        self._key = key
        self._renderer: Renderer | None = None

    def __len__(self) -> int:
        return len(self.tforms)

    def renderer(self) -> Renderer:
        """The scan's renderer (builds/fetches the subject's anatomy and speckle tiles)."""
        if self._renderer is None:
            tiles = speckle_tiles(self.seed)
            rng = np.random.default_rng([self.seed, self.subject, self._key, 2])
            mean = self.arm_from_image[:, :3, :3].mean(0)
            u, _, vt = np.linalg.svd(mean)
            mean_rot = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt
            self._renderer = Renderer(
                anatomy_volume(self.seed, self.subject),
                self._mirror,
                tiles,
                tile_poses(rng, tiles, mean_rot),
                self.fan,
                noise_seed=int(rng.integers(2**31)),
            )
        return self._renderer

    def render(self, index: int) -> np.ndarray:
        """Frame ``index``: (H, W) uint8."""
        return self.renderer().render(self.arm_from_image[index], index)

    def frame_chunks(self, chunk: int = 32) -> Iterator[np.ndarray]:
        """Yield the frames in order as (n, H, W) uint8 arrays of ``chunk`` frames (the
        last may be shorter), N frames in total."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        ren = self.renderer()
        n = len(self)
        with ThreadPoolExecutor(RENDER_THREADS) as pool:
            for start in range(0, n, chunk):
                idx = range(start, min(start + chunk, n))
                out = np.empty((len(idx), *self.image_size), np.uint8)

                def one(i: int, out=out, start=start) -> None:
                    out[i - start] = ren.render(self.arm_from_image[i], i)

                list(pool.map(one, idx))
                yield out

    def frames(self) -> np.ndarray:
        """All frames at once: (N, H, W) uint8 (for small scans; 470 MB per 1,600 frames)."""
        return np.concatenate(list(self.frame_chunks(64)), axis=0)


def simulate_scan(
    subject: int,
    name: str,
    n_frames: int,
    seed: int = 0,
    calib: Calibration | None = None,
    image_size: tuple[int, int] = (480, 640),
) -> SimulatedScan:
    """Simulate scan ``name`` of ``subject``: poses now, frames lazily (SimulatedScan).

    Deterministic in (seed, subject, name, n_frames, image_size): the anatomy depends only on
    (seed, subject), the trajectory and speckle realisation on (seed, subject, name).
    calib: None -> geometry.default_calibration() (the 2024 TUS-REC values).
    """
    return SimulatedScan(subject, name, n_frames, seed, calib or default_calibration(), image_size)
