"""Training clips with labels that stay right under augmentation.

A sample is a clip of T consecutive frames of a scan (T-1 transitions, labels
T(i->i-1) in image mm), G global frames spread (jittered) over the whole scan, and the
scan positions the predictor would give them (inputs.scan_positions: transitions over
n-1, global frames over n, where n is the length of the scan as augmented).

Augmentations act on the whole scan (the "view"), so positions are those of the
augmented scan:

* frame skip k: every k-th frame; a local becomes the product of k consecutive locals;
* reversal: frames in reverse order; locals become the inverses, in reverse order;
* mirroring: image columns flipped inside the crop; every transform T becomes F T F,
  F the reflection x -> 2c - x (image mm) about the crop centre c = sx (left+right+1)/2;
* intensity: a random gamma, contrast and brightness on the uint8 range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tusrec.data import ScanPattern, parse_scan_key
from tusrec.model.inputs import scan_code, scan_positions
from tusrec.train.cache import CachedScan
from tusrec.train.config import AugmentConfig

LOSS_GRID = 5  # the loss probes the four corners and a LOSS_GRID x LOSS_GRID grid


def reverse_locals(local: np.ndarray) -> np.ndarray:
    """Locals of the reversed scan: (n-1, 4, 4) -> (n-1, 4, 4), inv(local[::-1]) float64."""
    return np.linalg.inv(np.asarray(local, np.float64)[::-1])


def skip_locals(local: np.ndarray, k: int) -> np.ndarray:
    """Locals of frames 0, k, 2k, ...: (n-1, 4, 4) -> ((n-1)//k, 4, 4) float64, entry m the
    product local[mk] @ ... @ local[mk+k-1] (T(mk+k -> mk))."""
    local = np.asarray(local, np.float64)
    m = len(local) // k
    out = local[0 : m * k : k].copy()
    for j in range(1, k):
        out = out @ local[j : m * k : k]
    return out


def mirror_matrix(box: tuple[int, int, int, int], sx: float) -> np.ndarray:
    """F (4, 4): the reflection x -> 2c - x in image mm about the crop's centre column.

    box (top, bottom, left, right) in 0-based pixels, end exclusive: the crop's 1-based
    pixel columns are left+1..right, centre (left+right+1)/2 pixels, c = sx times that.
    Flipping the crop's columns maps pixel x to left+right+1-x, i.e. mm x to 2c - x.
    """
    F = np.eye(4)
    F[0, 0] = -1.0
    F[0, 3] = sx * (box[2] + box[3] + 1)
    return F


def mirror_transforms(T: np.ndarray, F: np.ndarray) -> np.ndarray:
    """T (..., 4, 4) -> F T F (F is its own inverse): the transforms of the mirrored scan."""
    return F @ np.asarray(T, np.float64) @ F


def remap_intensity(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random monotone remapping of uint8-range frames (n, h, w) -> float32 in [0, 255]:
    gamma in [0.7, 1.4], contrast in [0.8, 1.2], brightness in [-10, 10]. Zero (outside the
    fan) stays near zero up to the brightness shift."""
    x = frames.astype(np.float32) / 255.0
    x = x ** rng.uniform(0.7, 1.4)
    x = x * rng.uniform(0.8, 1.2) * 255.0 + rng.uniform(-10.0, 10.0)
    return np.clip(x, 0.0, 255.0)


def loss_points(image_size: tuple[int, int], sx: float, sy: float, grid: int = LOSS_GRID) -> np.ndarray:
    """Probe points of the original image in image mm, homogeneous: (4 + grid^2, 4) float32.

    The four corner pixels (1,1), (W,1), (1,H), (W,H) and a grid x grid lattice spanning
    the image, 1-based pixels scaled by (sx, sy)."""
    h, w = image_size
    xs = np.concatenate([[1, w, 1, w], np.tile(np.linspace(1, w, grid), grid)])
    ys = np.concatenate([[1, 1, h, h], np.repeat(np.linspace(1, h, grid), grid)])
    return np.stack([xs * sx, ys * sy, np.zeros_like(xs), np.ones_like(xs)], axis=1).astype(np.float32)


class ClipSampler:
    """Random training clips from cached scans.

    scans: CachedScan list (scans shorter than ``clip_frames`` are never drawn); a scan is
    drawn with probability proportional to its length, or, with ``rotation_share`` > 0, the
    2025 rotation scans together with that probability and the other scans with the rest
    (each by length within its group). ``sample()`` returns one clip as
    numpy arrays, ``batch(B)`` stacks B of them:

        frames (T, h, w) float32, uint8 range (normalise with inputs.normalise_frames)
        decorrelation (m, T, h, w) uint8 encoded NCC of each clip frame with the frame j
            before it in the (augmented) view, channel j-1 for frame steps j = 1..m (m =
            ``decorrelation``); the first j frames of a view with the frame j after them,
            as inputs.read_scan_input gives the predictor (only with ``decorrelation`` > 0)
        positions (T-1,) float32, scan positions of the clip's transitions
        global_frames (G, h, w) float32, uint8 range
        global_positions (G,) float32
        local (T-1, 4, 4) float32 labels T(i->i-1) in image mm
        points (P, 4) float32 loss probe points in image mm
        indices (T,) int64 original frame indices of the clip (for checks and debugging)
        code (4,) float32 the scan code of the view (inputs.scan_code: the direction
            negated for a reversed view; zeros with probability augment.forget_name), only
            with ``conditioning``
    """

    def __init__(
        self,
        scans: list[CachedScan],
        clip_frames: int,
        global_frames: int,
        augment: AugmentConfig,
        T_scale: np.ndarray,
        rng: np.random.Generator,
        decorrelation: int = 0,
        conditioning: bool = False,
        rotation_share: float = 0.0,
    ):
        self.conditioning = conditioning
        self.scans = [s for s in scans if s.n_frames >= clip_frames]
        if not self.scans:
            raise ValueError(f"no training scan has at least clip_frames={clip_frames} frames")
        # How many decorrelation channels (frame steps 1..m of the view); True is 1.
        self.decorrelation = int(decorrelation)
        if decorrelation:
            steps = set(decorrelation_frame_steps(self.decorrelation, augment.frame_skip))
            lacking = [s.key for s in self.scans if not steps <= set(s.decorrelation)]
            if lacking:
                raise ValueError(
                    f"scans {lacking[:3]} lack decorrelation maps for frame steps {sorted(steps)}"
                )
        weights = np.array([s.n_frames for s in self.scans], np.float64)
        if rotation_share > 0:
            rotation = np.array([is_rotation_scan(s.key) for s in self.scans])
            if rotation.all() or not rotation.any():
                raise ValueError(
                    f"rotation_share {rotation_share} needs both rotation scans and sweeps to train on; "
                    f"these {len(rotation)} scans are {'all' if rotation.all() else 'none'} rotation scans"
                )
            weights[rotation] *= rotation_share / weights[rotation].sum()
            weights[~rotation] *= (1 - rotation_share) / weights[~rotation].sum()
        self.p = weights / weights.sum()
        self.T = clip_frames
        self.G = global_frames
        self.augment = augment
        self.sx, self.sy = float(T_scale[0, 0]), float(T_scale[1, 1])
        self.rng = rng

    def sample(
        self,
        scan: CachedScan | None = None,
        rng: np.random.Generator | None = None,
        frames: int | None = None,
    ) -> dict:
        """One clip (the arrays above), drawn with ``rng`` (default: the sampler's own), of
        ``frames`` frames (default ``clip_frames``; at most that, so every scan holds it)."""
        rng = self.rng if rng is None else rng
        aug, T = self.augment, self.T if frames is None else int(frames)
        if not 2 <= T <= self.T:
            raise ValueError(f"a clip has 2 to clip_frames={self.T} frames, not {T}")
        if scan is None:
            scan = self.scans[rng.choice(len(self.scans), p=self.p)]
        n = scan.n_frames
        k_max = max(1, min(aug.frame_skip, (n - 1) // (T - 1)))  # the view must hold a clip
        k = int(rng.integers(1, k_max + 1))
        phase = int(rng.integers(0, k)) if k > 1 else 0
        # Keep the view long enough for a clip whatever the phase.
        while len(range(phase, n, k)) < T:
            phase -= 1
        view = np.arange(phase, n, k)  # original frame indices of the (forward) view
        reverse = aug.reverse and rng.random() < 0.5
        if reverse:
            view = view[::-1]
        n_view = len(view)
        start = int(rng.integers(0, n_view - T + 1))
        clip = view[start : start + T]
        lo = int(clip.min())
        local = skip_locals(scan.local[lo : lo + (T - 1) * k], k)  # forward, (T-1, 4, 4)
        if reverse:
            local = reverse_locals(local)
        # Global frames: evenly spread over the view, each jittered within its share.
        spacing = (n_view - 1) / max(self.G - 1, 1)
        gidx = np.linspace(0, n_view - 1, self.G) + rng.uniform(-0.5, 0.5, self.G) * spacing
        gidx = np.sort(np.clip(np.round(gidx), 0, n_view - 1).astype(int))
        frames = scan.frames[clip]
        gframes = scan.frames[view[gidx]]
        ncc = None
        if self.decorrelation:
            # For frame step j, frame view[p] pairs with view[p-j] (view[p+j] for p < j);
            # the step-jk map of the later frame of a pair holds the pair's NCC.
            pos = np.arange(start, start + T)
            ncc = np.stack(
                [
                    scan.decorrelation[j * k][
                        np.maximum(view[pos], view[np.where(pos >= j, pos - j, pos + j)])
                    ]
                    for j in range(1, self.decorrelation + 1)
                ]
            )
        if aug.mirror and rng.random() < 0.5:
            frames, gframes = frames[:, :, ::-1], gframes[:, :, ::-1]
            ncc = None if ncc is None else ncc[..., ::-1]
            local = mirror_transforms(local, mirror_matrix(scan.box, self.sx))
        if aug.intensity and rng.random() < 0.5:
            both = remap_intensity(np.concatenate([frames, gframes]), rng)
            frames, gframes = both[:T], both[T:]
        out = {
            "frames": np.ascontiguousarray(frames, np.float32),
            "positions": scan_positions(np.arange(start, start + T - 1), n_view - 1),
            "global_frames": np.ascontiguousarray(gframes, np.float32),
            "global_positions": scan_positions(gidx, n_view),
            "local": local.astype(np.float32),
            "points": loss_points(scan.image_size, self.sx, self.sy),
            "indices": clip.astype(np.int64),
        }
        if ncc is not None:
            out["decorrelation"] = np.ascontiguousarray(ncc)
        if self.conditioning:
            # Drawn last, so that the clips are those of an unconditioned run.
            forget = rng.random() < aug.forget_name
            out["code"] = scan_code(None if forget else parse_scan_key(scan.key)[1], reverse)
        return out

    def batch(self, size: int) -> dict[str, np.ndarray]:
        """``size`` clips stacked along a new leading axis (B, ...), drawn one after the
        other from the sampler's own generator (TrainConfig.sampling "sequential")."""
        return stack([self.sample() for _ in range(size)])

    def step_batch(
        self, seed: int, step: int, clips: range, frames: int | None = None
    ) -> dict[str, np.ndarray]:
        """Clips ``clips`` of the global batch of training step ``step``, each drawn with its
        own generator clip_rng(seed, step, index) (TrainConfig.sampling "per-clip"): the
        same clips whichever process or data-loader worker draws them, and in any order.
        ``frames``: the step's clip length (TrainConfig.clip_frames_at; default clip_frames)."""
        return stack([self.sample(rng=clip_rng(seed, step, i), frames=frames) for i in clips])


def decorrelation_frame_steps(channels: int, frame_skip: int) -> tuple[int, ...]:
    """Frame steps whose decorrelation maps clips need, sorted: j * k for each channel's
    step j in 1..``channels`` and frame skip k in 1..``frame_skip`` (a view of every k-th
    frame pairs frames j * k apart); () for no channels."""
    return tuple(sorted({j * k for j in range(1, channels + 1) for k in range(1, frame_skip + 1)}))


def is_rotation_scan(key: str) -> bool:
    """Whether a scan key names a 2025 rotation scan (``LH_rotation``, ``RH_rotation``)."""
    return ScanPattern.from_name(parse_scan_key(key)[1]).protocol == "2025"


def clip_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of training step ``step`` of a run with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence((seed, step, index)))


def stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Clips (dicts of arrays) stacked along a new leading axis (B, ...)."""
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


class StepBatches:
    """Training step -> that step's batch (the clips ``clips`` of its global batch), as a
    map-style dataset for torch's DataLoader: workers draw steps ahead of the training
    loop, and every batch is a function of (seed, step, clip index) alone, so the run does
    not depend on the number of workers or processes. Memory-mapped scans are shared
    with the workers, not copied (CachedScan pickles a mapped array as its file)."""

    def __init__(
        self,
        sampler: ClipSampler,
        seed: int,
        steps: int,
        clips: range,
        frames_at: Callable[[int], int] | None = None,
    ):
        self.sampler, self.seed, self.steps, self.clips = sampler, seed, steps, clips
        self.frames_at = frames_at  # step -> clip length (TrainConfig.clip_frames_at); None: fixed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        frames = None if self.frames_at is None else self.frames_at(int(step))
        return self.sampler.step_batch(self.seed, int(step), self.clips, frames)
