"""The error head: a member's own estimate of its error on each frame transition.

Why a head and not only the members' disagreement: the members' errors correlate
0.93-0.96, so where they agree says little about where they are wrong (Spearman rho
0.09 between disagreement and error on validation subject 011). Most of what they share
is motion whose size the frames show (speckle decorrelation) and whose sign nothing
gives, which every member predicts as about 0. A head that reads the member's features
can learn how large that left-over motion is, transition by transition.

The head (ModelConfig.error_head) is fitted after the pose, the rest of the network
frozen, on the member's own training scans run whole as the predictor runs them
(windowed inference, the scan name's code, no augmentation): what it learns is the
error of the member as ./predict uses it. For a transition with the member's error
e >= 0 (the mean distance, mm, over the training loss's probe points of the original
image, between where its T(i->i-1) and the true one put them: the frame's LPE) and the
head's output s, the loss is the negative log-likelihood of an exponential distribution
of mean exp(s):

    s + e * exp(-s)

whose minimiser over s is exp(s) = E[e | features]: the head predicts the expected
error in mm (calibrated, not only a ranking), and the pose is untouched: with the head
the member predicts exactly the transforms it predicted without it (tested).

Fitted on training clips instead (the member's sampler and augmentation), the head of
the best member ranked the errors on validation subject 011 worse: rho 0.21 with the
training augmentation, 0.27 without frame skipping and name dropping, against 0.36 on
whole scans; clips lack the context of a whole scan and err differently.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from tusrec.model.network import build_network
from tusrec.train.config import TrainConfig, TrainError
from tusrec.train.loss import point_distance

DEFAULT_STEPS = 2000
DEFAULT_LR = 1e-3
BATCH_TRANSITIONS = 1024


def with_error_head(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of a trained member's network with a fresh error head (ModelConfig.error_head)
    and the same weights everywhere else; a net that has one already is copied as is."""
    if net.cfg.error_head:
        import copy

        return copy.deepcopy(net)
    out = build_network(dataclasses.replace(net.cfg, error_head=True))
    missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(".error_head." not in f".{k}" for k in missing):
        raise TrainError(f"cannot add an error head: missing {missing}, unexpected {unexpected}")
    return out


def exponential_nll(s: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """The head's loss: s (...) log expected errors, error (...) mm >= 0 -> the mean of
    s + error * exp(-s), minimised by exp(s) = the mean error."""
    return (s + error * torch.exp(-s)).mean()


def _error_heads(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in net.named_modules() if name.split(".")[-1] == "error_head" and m is not None]


def scan_features(
    net: torch.nn.Module, inputs: np.ndarray, code: np.ndarray | None, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """What the error head of ``net`` (a network with one) reads on a whole scan, as the
    predictor runs it: inputs (N, C, h, w) (ScanInput.network_input), code the name's
    inputs.scan_code -> features (N-1, F) float32 and the member's T(i->i-1) (N-1, 4, 4)."""
    from tusrec.model.ensemble import Member, members_outputs, windows

    (head,) = _error_heads(net)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().cpu()))
    try:
        (out,) = members_outputs([Member("fit", net)], inputs, device, None, False, code)
    finally:
        hook.remove()
    n = len(inputs) - 1
    features = np.empty((n, seen[0].shape[-1]), np.float32)
    for z, (core, stop, lo, _) in zip(seen, windows(n, net.cfg.window, net.cfg.overlap), strict=True):
        features[core:stop] = z[0, core - lo : stop - lo].numpy()
    return features, out.local


def fit_error_head(
    net: torch.nn.Module,
    scans: list,
    T_scale: np.ndarray,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_TRANSITIONS,
    progress: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Fit the error head of ``net`` (a trained member; a head is added when it has none)
    on ``scans`` (CachedScan list: the member's training scans), each run whole through
    the frozen network once (scan_features) for the head's inputs and the member's error
    on every transition; then ``steps`` AdamW steps on batches of ``batch_size``
    transitions drawn with ``seed``, learning rate ``lr`` with a cosine decay.

    Returns the network on the CPU (every weight but the head's unchanged) and its record:
    steps, seed, lr, batch_size, transitions, seconds, the mean loss over the last
    quarter of the steps, and over all transitions the member's mean error and the
    head's mean expected error (mm)."""
    from tqdm import tqdm

    from tusrec.data import parse_scan_key
    from tusrec.model.inputs import scan_code
    from tusrec.train.sampler import loss_points

    if steps < 1:
        raise TrainError(f"error head: steps must be at least 1, got {steps}")
    started = time.perf_counter()
    device = torch.device(device)
    net = with_error_head(net).to(device).eval()
    torch.manual_seed(seed)
    (head,) = _error_heads(net)
    for layer in head:  # a fresh head for this seed
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    features, errors = [], []
    sx, sy = float(T_scale[0, 0]), float(T_scale[1, 1])
    for scan in tqdm(scans, desc="error head: scans", unit="scan", disable=not progress):
        if scan.n_frames < 2:
            continue
        z, local = scan_features(
            net, scan.normalised(len(net.cfg.frame_steps)), scan_code(parse_scan_key(scan.key)[1]), device
        )
        points = torch.from_numpy(loss_points(scan.image_size, sx, sy)).double()[None]
        e = point_distance(torch.from_numpy(local)[None], torch.from_numpy(scan.local)[None], points)[0]
        features.append(z)
        errors.append(e.float().numpy())
    X = torch.from_numpy(np.concatenate(features)).to(device)
    e = torch.from_numpy(np.concatenate(errors)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    rng = torch.Generator().manual_seed(seed)
    tail = max(1, steps // 4)
    loss_sum = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(X), (min(batch_size, len(X)),), generator=rng).to(device)
        loss = exponential_nll(head(X[idx])[:, 0], e[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - tail:
            loss_sum += loss.item()
    with torch.no_grad():
        expected = torch.exp(head(X)[:, 0])
    record = {
        "steps": steps,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "transitions": len(X),
        "seconds": round(time.perf_counter() - started, 3),
        "last_quarter_loss": loss_sum / tail,
        "mean_error_mm": float(e.mean()),
        "mean_expected_mm": float(expected.mean()),
    }
    return net.cpu(), record


def fit_members(
    weights_dir: str | Path,
    data_root: str | Path,
    names: list[str] | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Fit the error head of members ``names`` (default all) of weights folder
    ``weights_dir`` on the scans of their own training subjects (trained.train_subjects of
    each manifest entry) of ``data_root`` (fit_error_head), and save each back (new file and checksum; the
    entry keeps its training record and gains ``error_head``: the fit's record and its
    subjects). Every member is checked before any is fitted, so a bad entry changes
    nothing; members that share an input size and frame steps share one read of the data.
    Returns the new entries."""
    from tusrec.data import open_data
    from tusrec.model.ensemble import load_members, save_member
    from tusrec.train.cache import load_cache
    from tusrec.train.trainer import cache_steps

    members = load_members(weights_dir, "cpu", names)
    have = {scan.subject for scan in open_data(data_root).scans}
    plans = []  # (member, its training subjects, the cache it reads)
    for member in members:
        trained = member.info.get("trained")
        if not isinstance(trained, dict) or "config" not in trained or "train_subjects" not in trained:
            raise TrainError(
                f"member {member.name!r} has no training record (trained.config, trained.train_subjects) "
                "in its manifest entry: its error head is fitted on the subjects it was trained on"
            )
        subjects = [str(s) for s in trained["train_subjects"]]
        missing = sorted(set(subjects) - have)
        if missing:
            raise TrainError(
                f"member {member.name!r} was trained on subjects {missing} that {data_root} does not have: "
                "its error head is fitted on the data it was trained on"
            )
        frame_steps = cache_steps(TrainConfig.from_dict(trained["config"]))
        plans.append((member, subjects, (tuple(member.cfg.input_size), frame_steps)))
    caches: dict = {}
    entries = []
    for member, subjects, key in plans:
        if key not in caches:
            caches[key] = load_cache(data_root, key[0], None, progress, key[1], cache_dir)
        data = caches[key]
        net, record = fit_error_head(
            member.net,
            data.of_subjects(subjects),
            data.calib.T_scale,
            steps,
            seed,
            lr,
            device,
            progress=progress,
        )
        info = {k: v for k, v in member.info.items() if k not in ("name", "file", "sha256", "config")}
        info["error_head"] = {**record, "subjects": subjects}
        entries.append(save_member(weights_dir, member.name, net, info))
    return entries
