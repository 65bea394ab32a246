"""Ensemble members on disk, windowed inference, and combination (the scan
preprocessing they run on is tusrec.model.inputs).

weights/ layout::

    weights/manifest.json   {"members": [{"name", "file", "sha256", "config", "trained", "metrics"}]}
    weights/<file>.pt       a member's state_dict (torch.save)

A member's config (ModelConfig) travels with it, so the predictor builds the network the
member was trained with. A missing file or a wrong checksum is an error naming both.
"""

from __future__ import annotations

import copy
import fcntl
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tusrec.geometry import projected_mean_rotation, rotation_disagreement
from tusrec.model import manifest
from tusrec.model.inputs import (  # noqa: F401  (ScanInput ... re-exported: their old home)
    ScanInput,
    global_indices,
    normalise_frames,
    normalise_ncc,
    read_scan_input,
    scan_positions,
)
from tusrec.model.manifest import MANIFEST, WeightsError, checked_entries, sha256
from tusrec.model.network import ModelConfig, build_network, pose9_to_matrix


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
    members = []
    for entry in checked_entries(weights_dir, names):
        path = weights_dir / entry["file"]
        net = build_network(ModelConfig.from_dict(entry["config"]))
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.to(device).eval()
        members.append(Member(entry["name"], net, entry))
    return members


def ranked_by_validation(members: list[Member]) -> list[Member]:
    """Members best first by their manifest entries' validation (manifest.validation_key:
    the share of the identity's GPE left when all record it, else the validation GPE)."""
    key = manifest.validation_key([m.info for m in members])
    return sorted(members, key=lambda m: key(m.info))


def export_members(src: str | Path, dest: str | Path, top: int | None = None) -> list[str]:
    """Copy the ``top`` best members of weights folder ``src`` by validation
    (ranked_by_validation; all when None) into a new weights folder ``dest``: files and
    manifest entries unchanged, checksums verified on the way, and the error model
    (error_model.json) when it was fitted for exactly these members. Returns the exported
    names, best first.

    This is how a shipped ensemble is picked from a larger pool of trained seeds: by the
    held-out validation subjects, never by the benchmark's. ``dest`` must not hold a
    manifest yet (nothing is overwritten)."""
    import shutil

    src, dest = Path(src), Path(dest)
    if (dest / MANIFEST).exists():
        raise WeightsError(f"{dest / MANIFEST} exists: export into a new folder")
    from tusrec.model.error_model import ERROR_MODEL, load_error_model

    members = ranked_by_validation(load_members(src))  # verifies every checksum
    error_model = load_error_model(src)  # an unusable file stops the export before it writes
    if top is not None and not 1 <= top <= len(members):
        raise WeightsError(f"{src}: cannot pick {top} of its {len(members)} member(s)")
    keep = members[: top or len(members)]
    dest.mkdir(parents=True, exist_ok=True)
    for m in keep:
        shutil.copy2(src / m.info["file"], dest / m.info["file"])
    _write_manifest(dest, {"members": sorted((m.info for m in keep), key=lambda e: e["name"])})
    # The error model goes along only when it was fitted for exactly the members exported.
    if error_model is not None and error_model.fits([m.info for m in keep]):
        shutil.copy2(src / ERROR_MODEL, dest / ERROR_MODEL)
    return [m.name for m in keep]


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


class _Single:
    """One member behind the batched interface: outputs get a leading member axis of 1."""

    def __init__(self, member: Member):
        self.net = member.net

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.net.encode_global(frames, positions)[None]

    def forward(
        self, video: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, code: torch.Tensor | None
    ) -> torch.Tensor:
        return self.net(video, positions, tokens[0], code)[None]


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

    def forward(
        self, video: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, code: torch.Tensor | None
    ) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def one(p, b, t):
            return functional_call(self.base, (p, b), (video, positions, t, code))

        return vmap(one)(self.params, self.buffers, tokens)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def as_channels(inputs: np.ndarray) -> np.ndarray:
    """Network input (N, h, w) or (N, C, h, w) -> (N, C, h, w)."""
    return inputs[:, None] if inputs.ndim == 3 else inputs


@dataclass
class MemberOutput:
    """One member's prediction for a scan: local (N-1, 4, 4) float64 T(i->i-1), and with
    an error head (ModelConfig.error_head) its expected error (N-1,) float64, mm: the mean
    point distance it expects between its T(i->i-1) and the true one."""

    local: np.ndarray
    expected_error_mm: np.ndarray | None


def decorrelation_steps(members: list[Member]) -> int:
    """How many decorrelation channels (frame steps 1..m) the members' input needs: the
    most any member uses; each member takes the first cfg.in_channels (members_outputs)."""
    return max((len(m.cfg.frame_steps) for m in members), default=0)


@torch.no_grad()
def members_outputs(
    members: list[Member],
    inputs: np.ndarray,
    device: str | torch.device = "cpu",
    deadline: float | None = None,
    autocast: bool = False,
    code: np.ndarray | None = None,
) -> list[MemberOutput]:
    """Several members' predictions for a preprocessed scan, as one batched pass when they
    share a configuration (torch.func.vmap over their stacked weights), else one by one.

    inputs: (N, C, h, w) (ScanInput.network_input; channel 0 the frames, channel k the
    decorrelation of frame step k) or (N, h, w) frames only; a member uses its first
    cfg.in_channels.
    ``code``: the scan's (4,) inputs.scan_code of its name (None: unknown, as zeros); only
    members with ModelConfig.scan_conditioning use it.
    Members of several configurations (a mixed ensemble: sequence members beside
    frame-pair ones) run as one batched pass per configuration.
    Returns one MemberOutput per member, in the members' order. Checks ``deadline``
    between windows and raises OutOfTimeError past it.
    """
    inputs = as_channels(inputs)
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(json.dumps(m.cfg.to_dict(), sort_keys=True), []).append(i)
    if len(groups) > 1:
        out: list[MemberOutput | None] = [None] * len(members)
        for idx in groups.values():
            group = [members[i] for i in idx]
            for i, r in zip(
                idx, members_outputs(group, inputs, device, deadline, autocast, code), strict=True
            ):
                out[i] = r
        return out
    cfg = members[0].cfg
    if inputs.shape[1] < cfg.in_channels:
        raise ValueError(
            f"member {members[0].name!r} needs {cfg.in_channels} input channels "
            f"(frames{f' + decorrelation of frame steps {cfg.frame_steps}' if cfg.decorrelation else ''}), "
            f"got {inputs.shape[1]}"
        )
    inputs = inputs[:, : cfg.in_channels]
    n = len(inputs)
    runner = _Single(members[0]) if len(members) == 1 else _Batched(members)
    idx = global_indices(n, cfg.global_frames)
    g = torch.from_numpy(np.ascontiguousarray(inputs[idx, 0])).to(device)[None]
    gpos = torch.from_numpy(scan_positions(idx, n)).to(device)[None]
    code_t = None if code is None else torch.as_tensor(np.asarray(code, np.float32)).to(device)[None]
    amp = torch.autocast(device_type=torch.device(device).type, enabled=autocast)
    with amp, warnings.catch_warnings():
        # vmap falls back to a loop for fused attention kernels and says so every call.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        global_tokens = runner.encode_global(g, gpos)  # (M, 1, G, dim)
        raw = np.empty((len(members), n - 1, cfg.outputs), np.float32)
        for core, stop, lo, hi in windows(n - 1, cfg.window, cfg.overlap):
            if deadline is not None and time.perf_counter() > deadline:
                names = ", ".join(m.name for m in members)
                raise OutOfTimeError(f"member(s) {names} stopped at transition {core} of {n - 1}")
            # frames lo..hi as a video (1, C, T, h, w)
            video = torch.from_numpy(np.ascontiguousarray(inputs[lo : hi + 1].transpose(1, 0, 2, 3)))
            video = video.to(device)[None]
            pos = torch.from_numpy(scan_positions(np.arange(lo, hi), n - 1)).to(device)[None]
            out = runner.forward(video, pos, global_tokens, code_t)  # (M, 1, hi-lo, outputs)
            raw[:, core:stop] = out[:, 0, core - lo : stop - lo].float().cpu().numpy()
    # The rigid transforms are built in float64 whatever precision the network ran in.
    raw64 = torch.from_numpy(raw).double()
    locals_ = pose9_to_matrix(raw64[..., :9], cfg).numpy()
    errors = np.exp(raw64[..., 9].numpy()) if cfg.error_head else [None] * len(members)
    return [MemberOutput(loc, err) for loc, err in zip(locals_, errors, strict=True)]


@dataclass
class Combined:
    """Ensemble output: local (N-1, 4, 4) float64, per-frame uncertainties (N-1,)."""

    local: np.ndarray
    rotation_disagreement: np.ndarray  # rad^2: mean squared geodesic distance to the mean
    translation_spread_mm: np.ndarray  # RMS distance of members' translations to the mean
    # mm: the mean of the members' expected errors (error heads); None unless all have one
    expected_error_mm: np.ndarray | None = None


def combine(
    locals_: list[np.ndarray], translation: str = "mean", expected_errors: list | None = None
) -> Combined:
    """Combine members' local transforms, each (N-1, 4, 4).

    Rotations: projected mean (average the matrices, closest rotation by SVD).
    Translations: mean, or 'median' (per coordinate). Globals follow by chaining.
    ``expected_errors``: the members' MemberOutput.expected_error_mm, (N-1,) each or None;
    their mean is the ensemble's expected error when every member has one.
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
    expected = None
    if expected_errors and all(e is not None for e in expected_errors):
        expected = np.mean(np.stack(expected_errors), axis=0)
    return Combined(out, rotation_disagreement(R, dim=0).numpy(), spread, expected)


ProgressFn = Callable[[str], None]
