"""Ensemble members on disk, scan preprocessing, windowed inference, and combination.

weights/ layout::

    weights/manifest.json   {"members": [{"name", "file", "sha256", "config", "trained", "metrics"}]}
    weights/<file>.pt       a member's state_dict (torch.save)

A member's config (ModelConfig) travels with it, so the predictor builds the network the
member was trained with. A missing file or a wrong checksum is an error naming both.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from tusrec.geometry import projected_mean_rotation, rotation_disagreement
from tusrec.model.network import ModelConfig, build_network, pose9_to_matrix

MANIFEST = "manifest.json"
# Fixed intensity normalisation (uint8 -> roughly zero mean, unit spread on B-mode data).
INTENSITY_MEAN, INTENSITY_STD = 40.0, 40.0


class WeightsError(ValueError):
    """weights/ is missing, incomplete or corrupt."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Member:
    name: str
    net: torch.nn.Module  # TrackerlessNet or PairNet (build_network)
    info: dict = field(default_factory=dict)

    @property
    def cfg(self) -> ModelConfig:
        return self.net.cfg


def save_member(weights_dir: str | Path, name: str, net: torch.nn.Module, info: dict | None = None) -> dict:
    """Save a member's weights and add (or replace) its manifest entry; returns the entry."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    entry = {
        "name": name,
        "file": path.name,
        "sha256": sha256(path),
        "config": net.cfg.to_dict(),
        **(info or {}),
    }
    manifest_path = weights_dir / MANIFEST
    # Members trained in parallel processes share a manifest: update it under a lock.
    with open(weights_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"members": []}
        manifest["members"] = [m for m in manifest["members"] if m["name"] != name] + [entry]
        manifest["members"].sort(key=lambda m: m["name"])
        _write_manifest(weights_dir, manifest)
    return entry


def _write_manifest(weights_dir: Path, manifest: dict) -> None:
    """Write weights_dir/manifest.json whole or not at all (temporary name, then rename)."""
    tmp = weights_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(weights_dir / MANIFEST)


def load_members(
    weights_dir: str | Path, device: str | torch.device = "cpu", names: list[str] | None = None
) -> list[Member]:
    """Load every member of weights/manifest.json (or only those ``names``), verifying each
    file's sha256."""
    weights_dir = Path(weights_dir)
    manifest_path = weights_dir / MANIFEST
    if not manifest_path.is_file():
        raise WeightsError(f"{manifest_path}: no weights manifest (expected {MANIFEST} listing the members)")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{manifest_path}: not a weights manifest ({err})") from None
    if names is not None:
        unknown = sorted(set(names) - {e["name"] for e in entries})
        if unknown:
            listed = sorted(e["name"] for e in entries)
            raise WeightsError(f"{manifest_path}: no member(s) {unknown} (it lists {listed})")
        entries = [e for e in entries if e["name"] in set(names)]
    if not entries:
        raise WeightsError(f"{manifest_path}: lists no members")
    members = []
    for entry in entries:
        path = weights_dir / entry["file"]
        if not path.is_file():
            raise WeightsError(f"{manifest_path}: member {entry['name']!r}: file {path} is missing")
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise WeightsError(
                f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']} "
                f"(member {entry['name']!r}): the file is corrupt or was replaced"
            )
        net = build_network(ModelConfig.from_dict(entry["config"]))
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.to(device).eval()
        members.append(Member(entry["name"], net, entry))
    return members


def validation_gpe(member: Member) -> float:
    """A member's held-out GPE from its manifest entry (mm; inf when it has none)."""
    return float(member.info.get("metrics", {}).get("val_GPE", float("inf")))


def export_members(src: str | Path, dest: str | Path, top: int | None = None) -> list[str]:
    """Copy the ``top`` members of weights folder ``src`` with the lowest validation GPE
    (all when None) into a new weights folder ``dest``: files and manifest entries
    unchanged, checksums verified on the way. Returns the exported names, best first.

    This is how a shipped ensemble is picked from a larger pool of trained seeds: by the
    held-out validation subjects, never by the benchmark's. ``dest`` must not hold a
    manifest yet (nothing is overwritten)."""
    import shutil

    src, dest = Path(src), Path(dest)
    if (dest / MANIFEST).exists():
        raise WeightsError(f"{dest / MANIFEST} exists: export into a new folder")
    members = sorted(load_members(src), key=validation_gpe)  # verifies every checksum
    if top is not None and not 1 <= top <= len(members):
        raise WeightsError(f"{src}: cannot pick {top} of its {len(members)} member(s)")
    keep = members[: top or len(members)]
    dest.mkdir(parents=True, exist_ok=True)
    for m in keep:
        shutil.copy2(src / m.info["file"], dest / m.info["file"])
    _write_manifest(dest, {"members": sorted((m.info for m in keep), key=lambda e: e["name"])})
    return [m.name for m in keep]


# --------------------------------------------------------------------------- preprocessing


def field_of_view_box(frames: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the pixels non-zero in any of ``frames``
    (n, H, W): the ultrasound fan. The whole image if all are zero."""
    seen = (frames > 0).any(axis=0)
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    if len(rows) == 0:
        return 0, frames.shape[1], 0, frames.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def preprocess_u8(frames: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop to the field of view and resize by area averaging: (n, H, W) uint8 -> (n, h, w)
    uint8 with size = (h, w). Any input image size works: the network only sees ``size``."""
    top, bottom, left, right = box
    h, w = size
    out = np.empty((len(frames), h, w), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame[top:bottom, left:right], (w, h), interpolation=cv2.INTER_AREA)
    return out


def normalise_frames(frames):
    """uint8-range frames (numpy or torch) -> float32 (x - INTENSITY_MEAN) / INTENSITY_STD."""
    if isinstance(frames, np.ndarray):
        return (frames.astype(np.float32) - INTENSITY_MEAN) / INTENSITY_STD
    return (frames.float() - INTENSITY_MEAN) / INTENSITY_STD


def preprocess(frames: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop, resize and normalise: (n, H, W) uint8 -> (n, h, w) float32."""
    return normalise_frames(preprocess_u8(frames, box, size))


# ----------------------------------------------------------- speckle decorrelation maps
#
# Out-of-plane motion shows in ultrasound as speckle decorrelation between neighbouring
# frames, but speckle is a fine-grained pattern (a pixel or two at 480 x 640) that the
# area-averaged network input (64 x 80: 6-8 pixels per input pixel) wipes out. So the
# decorrelation is measured at native resolution, as one normalised cross-correlation
# (NCC) per input pixel's block of native pixels, and given to the local encoder as a
# second channel. It is stored as uint8 (NCC in [-1, 1] -> 0..255), the same in training
# and prediction, so both see bit-identical inputs.

NCC_MIN_VARIANCE = 1.0  # a block flatter than this (outside the fan) has no defined NCC -> 0
NCC_MEAN, NCC_STD = 0.5, 0.25  # network input = (NCC - NCC_MEAN) / NCC_STD
NCC_NO_PAIR = 255  # encoded NCC 1.0 ("no evidence of motion") for a frame with no partner


def encode_ncc(ncc: np.ndarray) -> np.ndarray:
    """NCC in [-1, 1] -> uint8 0..255 (steps of 1/127.5)."""
    return np.clip(np.rint((np.asarray(ncc, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def normalise_ncc(encoded):
    """uint8 encoded NCC (numpy or torch) -> float32 network input (NCC - NCC_MEAN) / NCC_STD."""
    x = encoded.astype(np.float32) if isinstance(encoded, np.ndarray) else encoded.float()
    return (x / 127.5 - 1.0 - NCC_MEAN) / NCC_STD


def block_moments(crop: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block mean and variance (h, w) float32 of an image crop (H', W') float32 over
    the blocks that area-resizing to ``size`` = (h, w) averages (INTER_AREA moments)."""
    h, w = size
    mean = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
    return mean, cv2.resize(crop * crop, (w, h), interpolation=cv2.INTER_AREA) - mean * mean


def block_ncc(a: np.ndarray, b: np.ndarray, size: tuple[int, int], moments=None) -> np.ndarray:
    """NCC of two images a, b (H', W') float32 over the blocks that area-resizing to
    ``size`` = (h, w) averages: cov / sqrt(var_a var_b), each moment a block mean.
    ``moments``: (block_moments(a), block_moments(b)) when already known. Returns (h, w)
    float32 in [-1, 1], 0 where a block is flat (variance below NCC_MIN_VARIANCE)."""
    h, w = size
    (ea, va), (eb, vb) = moments or (block_moments(a, size), block_moments(b, size))
    cov = cv2.resize(a * b, (w, h), interpolation=cv2.INTER_AREA) - ea * eb
    ok = (va > NCC_MIN_VARIANCE) & (vb > NCC_MIN_VARIANCE)
    out = np.zeros((h, w), np.float32)
    out[ok] = cov[ok] / np.sqrt(va[ok] * vb[ok])
    return np.clip(out, -1.0, 1.0)


def decorrelation_u8(
    frames: np.ndarray,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    steps: tuple[int, ...] = (1,),
    before: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Encoded block NCC of each frame with the frame k before it, for each k in ``steps``.

    frames (n, H, W) uint8, consecutive frames of a scan; before: the (up to max(steps))
    frames that precede them in the scan, None at the scan's start. Returns k -> (n, h, w)
    uint8; a frame with no partner k frames back gets NCC_NO_PAIR (the caller of a whole
    scan replaces those, see fill_scan_start). Each frame's block moments are computed
    once and shared by all its pairs.
    """
    top, bottom, left, right = box
    h, w = size
    prev = [] if before is None or not steps else list(before[-max(steps) :])
    crops = [f[top:bottom, left:right].astype(np.float32) for f in [*prev, *frames]]
    moments = [block_moments(c, size) for c in crops]
    out = {k: np.full((len(frames), h, w), NCC_NO_PAIR, np.uint8) for k in steps}
    for j in range(len(frames)):
        i = len(prev) + j
        for k in steps:
            if i >= k:
                ncc = block_ncc(crops[i - k], crops[i], size, (moments[i - k], moments[i]))
                out[k][j] = encode_ncc(ncc)
    return out


def fill_scan_start(maps: np.ndarray, step: int) -> np.ndarray:
    """Frames 0..step-1 of a scan have no frame ``step`` before them: give them the NCC of
    the pair (j, j+step) instead (NCC is symmetric: that is maps[j + step]). In place."""
    n = len(maps)
    for j in range(min(step, n)):
        if j + step < n:
            maps[j] = maps[j + step]
    return maps


FOV_FRAMES = 32  # frames the field of view is found from


@dataclass
class ScanInput:
    """A scan as the networks see it, before normalisation.

    frames (N, h, w) uint8: cropped to the field of view ``box`` (top, bottom, left,
    right; original 0-based pixels, end exclusive) and resized; decorrelation: step k ->
    (N, h, w) uint8 encoded block NCC of frame j with frame j-k (frames j < k: with j+k).
    """

    frames: np.ndarray
    decorrelation: dict[int, np.ndarray]
    box: tuple[int, int, int, int]

    def network_input(self, step: int = 1) -> np.ndarray:
        """(N, C, h, w) float32: normalised frames, plus the step-``step`` decorrelation
        channel when it was computed."""
        channels = [normalise_frames(self.frames)]
        if step in self.decorrelation:
            channels.append(normalise_ncc(self.decorrelation[step]))
        return np.stack(channels, axis=1)


def read_scan_input(scan, size: tuple[int, int], steps: tuple[int, ...] = (1,), chunk: int = 64) -> ScanInput:
    """Read a scan (data.Scan) chunk by chunk into a ScanInput of input size ``size`` (h, w),
    with decorrelation maps for each frame step in ``steps`` (none when empty). Only one
    chunk of full-resolution frames is in memory at a time."""
    box = field_of_view_box(scan.read_frames(0, min(scan.n_frames, FOV_FRAMES)))
    frames, maps = [], {k: [] for k in steps}
    keep = max(steps, default=0)
    tail = None
    for _, part in scan.iter_frames(chunk):
        frames.append(preprocess_u8(part, box, size))
        for k, m in decorrelation_u8(part, box, size, steps, tail).items():
            maps[k].append(m)
        if keep:
            tail = part[-keep:] if tail is None else np.concatenate([tail, part])[-keep:]
    decorrelation = {k: fill_scan_start(np.concatenate(v), k) for k, v in maps.items()}
    return ScanInput(np.concatenate(frames), decorrelation, box)


def global_indices(n_frames: int, count: int) -> np.ndarray:
    """``count`` frame indices spread evenly over the scan, first and last included."""
    return np.unique(np.round(np.linspace(0, n_frames - 1, count)).astype(int))


def scan_positions(indices: np.ndarray, n_frames: int) -> np.ndarray:
    """Frame (or transition) indices -> scan positions in [0, 1]."""
    return np.asarray(indices, np.float32) / max(n_frames - 1, 1)


class OutOfTimeError(Exception):
    """A member could not finish before its deadline."""


def windows(n_transitions: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Cut transitions 0..n-1 into windows: (core_start, core_stop, in_start, in_stop).

    Transition k is frame k -> k+1. A window runs the network on transitions
    in_start..in_stop-1 (the core plus up to ``overlap`` of context on each side) and
    keeps the core: every kept output saw context on both sides, so no seam shows.
    """
    out = []
    for core in range(0, n_transitions, window):
        stop = min(core + window, n_transitions)
        out.append((core, stop, max(0, core - overlap), min(n_transitions, stop + overlap)))
    return out


@torch.no_grad()
def member_local_transforms(
    member: Member,
    inputs: np.ndarray,
    device: str | torch.device = "cpu",
    deadline: float | None = None,
    autocast: bool = False,
) -> np.ndarray:
    """One member's T(i->i-1) for a preprocessed scan: inputs (N, [C,] h, w) -> (N-1, 4, 4) float64.

    Checks ``deadline`` (time.perf_counter() value) between windows and raises
    OutOfTimeError past it, so a slow member never overruns by more than one window.
    """
    return members_local_transforms([member], inputs, device, deadline, autocast)[0]


class _Single:
    """One member behind the batched interface: outputs get a leading member axis of 1."""

    def __init__(self, member: Member):
        self.net = member.net

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.net.encode_global(frames, positions)[None]

    def forward(self, video: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(video, positions, tokens[0])[None]


class _Batched:
    """Members of one configuration as a single pass: torch.func.vmap over their stacked
    weights. Outputs carry a leading member axis (M, ...)."""

    def __init__(self, members: list[Member]):
        from torch.func import stack_module_state

        self.params, self.buffers = stack_module_state([m.net for m in members])
        self.base = copy.deepcopy(members[0].net).to("meta")

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        if not hasattr(self.base, "global_"):  # no global encoder (PairNet): nothing to batch
            tokens = self.base.encode_global(frames, positions)
            return tokens[None].expand(len(next(iter(self.params.values()))), *tokens.shape)
        params, buffers = _sub(self.params, "global_."), _sub(self.buffers, "global_.")
        return vmap(lambda p, b: functional_call(self.base.global_, (p, b), (frames, positions)))(
            params, buffers
        )

    def forward(self, video: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def one(p, b, t):
            return functional_call(self.base, (p, b), (video, positions, t))

        return vmap(one)(self.params, self.buffers, tokens)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def as_channels(inputs: np.ndarray) -> np.ndarray:
    """Network input (N, h, w) or (N, C, h, w) -> (N, C, h, w)."""
    return inputs[:, None] if inputs.ndim == 3 else inputs


@torch.no_grad()
def members_local_transforms(
    members: list[Member],
    inputs: np.ndarray,
    device: str | torch.device = "cpu",
    deadline: float | None = None,
    autocast: bool = False,
) -> list[np.ndarray]:
    """Several members' T(i->i-1) for a preprocessed scan, as one batched pass when they
    share a configuration (torch.func.vmap over their stacked weights), else one by one.

    inputs: (N, C, h, w) (ScanInput.network_input; channel 0 the frames, channel 1 the
    decorrelation) or (N, h, w) frames only; a member uses its first cfg.in_channels.
    Returns one (N-1, 4, 4) float64 array per member. Checks ``deadline`` between windows
    and raises OutOfTimeError past it.
    """
    inputs = as_channels(inputs)
    cfgs = [m.cfg.to_dict() for m in members]
    if len(members) > 1 and any(c != cfgs[0] for c in cfgs):
        return [r for m in members for r in members_local_transforms([m], inputs, device, deadline, autocast)]
    cfg = members[0].cfg
    if inputs.shape[1] < cfg.in_channels:
        raise ValueError(
            f"member {members[0].name!r} needs {cfg.in_channels} input channels "
            f"(frames{' + decorrelation' if cfg.decorrelation else ''}), got {inputs.shape[1]}"
        )
    inputs = inputs[:, : cfg.in_channels]
    n = len(inputs)
    runner = _Single(members[0]) if len(members) == 1 else _Batched(members)
    idx = global_indices(n, cfg.global_frames)
    g = torch.from_numpy(np.ascontiguousarray(inputs[idx, 0])).to(device)[None]
    gpos = torch.from_numpy(scan_positions(idx, n)).to(device)[None]
    amp = torch.autocast(device_type=torch.device(device).type, enabled=autocast)
    with amp, warnings.catch_warnings():
        # vmap falls back to a loop for fused attention kernels and says so every call.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        global_tokens = runner.encode_global(g, gpos)  # (M, 1, G, dim)
        raw = np.empty((len(members), n - 1, 9), np.float32)
        for core, stop, lo, hi in windows(n - 1, cfg.window, cfg.overlap):
            if deadline is not None and time.perf_counter() > deadline:
                names = ", ".join(m.name for m in members)
                raise OutOfTimeError(f"member(s) {names} stopped at transition {core} of {n - 1}")
            # frames lo..hi as a video (1, C, T, h, w)
            video = torch.from_numpy(np.ascontiguousarray(inputs[lo : hi + 1].transpose(1, 0, 2, 3)))
            video = video.to(device)[None]
            pos = torch.from_numpy(scan_positions(np.arange(lo, hi), n - 1)).to(device)[None]
            out = runner.forward(video, pos, global_tokens)  # (M, 1, hi-lo, 9)
            raw[:, core:stop] = out[:, 0, core - lo : stop - lo].float().cpu().numpy()
    # The rigid transforms are built in float64 whatever precision the network ran in.
    return list(pose9_to_matrix(torch.from_numpy(raw).double(), cfg).numpy())


@dataclass
class Combined:
    """Ensemble output: local (N-1, 4, 4) float64, per-frame uncertainties (N-1,)."""

    local: np.ndarray
    rotation_disagreement: np.ndarray  # rad^2: mean squared geodesic distance to the mean
    translation_spread_mm: np.ndarray  # RMS distance of members' translations to the mean


def combine(locals_: list[np.ndarray], translation: str = "mean") -> Combined:
    """Combine members' local transforms, each (N-1, 4, 4).

    Rotations: projected mean (average the matrices, closest rotation by SVD).
    Translations: mean, or 'median' (per coordinate). Globals follow by chaining.
    """
    stack = np.stack(locals_)  # (M, N-1, 4, 4)
    R = torch.from_numpy(stack[:, :, :3, :3])
    t = stack[:, :, :3, 3]
    out = np.tile(np.eye(4), (stack.shape[1], 1, 1))
    out[:, :3, :3] = projected_mean_rotation(R, dim=0).numpy()
    if translation == "mean":
        out[:, :3, 3] = t.mean(axis=0)
    elif translation == "median":
        out[:, :3, 3] = np.median(t, axis=0)
    else:
        raise ValueError(f"translation combination must be 'mean' or 'median', got {translation!r}")
    spread = np.sqrt(((t - t.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))
    return Combined(out, rotation_disagreement(R, dim=0).numpy(), spread)


ProgressFn = Callable[[str], None]
