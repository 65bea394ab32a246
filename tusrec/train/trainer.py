"""train_member: one ensemble member, with checkpoints, resume, a CSV log and validation.

out_dir/
    config.json   the TrainConfig of the run
    last.pt       model, optimiser, step, rng states, best metric: resume point
    best.pt       the same at the best validation GPE (or the last step without validation)
    log.csv       step, loss, points_mm, drift_mm, lr, val_GPE, val_LPE, seconds
    cache/        the memory-mapped data cache under DDP when no --cache is given
    weights/      the best member, saved with ensemble.save_member (manifest.json + .pt)
"""

from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from tusrec.data import open_data, parse_scan_key
from tusrec.geometry import compose_local
from tusrec.model.ensemble import Member, members_outputs, save_member
from tusrec.model.inputs import normalise_frames, normalise_ncc, scan_code
from tusrec.model.network import ModelConfig, build_network, pose9_to_matrix
from tusrec.predict.core import pick_device
from tusrec.scoring.metrics import transform_pixel_error as mean_pixel_error
from tusrec.train.cache import CachedScan, TrainData, load_cache, split_subjects
from tusrec.train.config import TrainConfig, TrainError
from tusrec.train.distributed import Context, context
from tusrec.train.loss import clip_loss
from tusrec.train.sampler import ClipSampler, StepBatches, decorrelation_frame_steps

LOG_COLUMNS = ("step", "loss", "points_mm", "drift_mm", "lr", "val_GPE", "val_LPE", "seconds")
LOG_EVERY = 10  # steps between training-loss rows of the log


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def validate(
    net: torch.nn.Module,
    scans: list[CachedScan],
    T_scale: np.ndarray,
    device,
    ctx: Context | None = None,
) -> dict[str, float]:
    """Run the member on whole scans as the predictor does; mean per-scan GPE and LPE (mm).

    Under DDP (``ctx``) each process runs every world-th scan and the sums are combined:
    every process gets the mean over all ``scans``."""
    ctx = ctx or Context(device=torch.device(device))
    was_training = net.training
    net.eval()
    gpe, lpe = [], []
    autocast = torch.device(device).type == "cuda"  # as the predictor runs on a GPU
    try:
        for scan in scans[ctx.rank :: ctx.world]:
            code = scan_code(parse_scan_key(scan.key)[1])  # as the predictor codes the scan's name
            (out,) = members_outputs(
                [Member("val", net)], scan.normalised(len(net.cfg.frame_steps)), device, None, autocast, code
            )
            local = out.local
            gpe.append(mean_pixel_error(compose_local(local), scan.global_, T_scale, scan.image_size))
            lpe.append(mean_pixel_error(local, scan.local, T_scale, scan.image_size))
    finally:
        net.train(was_training)
    if not ctx.distributed:
        return {"val_GPE": float(np.mean(gpe)), "val_LPE": float(np.mean(lpe))}
    total_gpe, total_lpe, count = ctx.sum([float(np.sum(gpe)), float(np.sum(lpe)), float(len(gpe))])
    return {"val_GPE": total_gpe / count, "val_LPE": total_lpe / count}


def identity_gpe(scans: list[CachedScan], T_scale: np.ndarray) -> float:
    """GPE (mm, mean per scan, as validate) of predicting no motion on ``scans``: the
    no-motion plateau's level, against which a member's val_GPE says whether it learned."""
    return float(
        np.mean(
            [
                mean_pixel_error(np.tile(np.eye(4), (len(s.global_), 1, 1)), s.global_, T_scale, s.image_size)
                for s in scans
            ]
        )
    )


def _to_torch(batch: dict, device) -> dict[str, torch.Tensor]:
    """A sampler batch (numpy arrays, or the tensors a DataLoader made of them) as network
    inputs: video (B, C, T, h, w) normalised (frames, then the decorrelation channels when
    the batch has them), global_frames normalised, the rest as is."""
    out = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items() if k != "indices"}
    channels = [normalise_frames(out.pop("frames"))[:, None]]
    if "decorrelation" in out:
        channels.append(normalise_ncc(out.pop("decorrelation")))  # (B, m, T, h, w)
    out["video"] = torch.cat(channels, dim=1)
    out["global_frames"] = normalise_frames(out["global_frames"])
    return out


class _Step(torch.nn.Module):
    """The network's whole training forward as one module call (global tokens, then the
    local pass), so that DDP sees every parameter used inside its forward."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, global_frames, global_positions, video, positions, code=None) -> torch.Tensor:
        tokens = self.net.encode_global(global_frames, global_positions)
        return self.net(video, positions, tokens, code)  # raw (B, T-1, 9)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype training uses on ``device``: bfloat16 on a GPU that supports it,
    else float16 (with a GradScaler); None on the CPU (float32 throughout, as always)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def training_step(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, amp: torch.dtype | None = None
) -> dict:
    """Forward a batch (see ClipSampler, _to_torch) and return the loss terms (mm).

    ``net``: the network, or a _Step of it (DDP-wrapped or not). ``amp``: autocast dtype of
    the network's forward; the rotations built from its output, their chaining over the
    clip and the losses are float32 whatever it is (autocast would run the 4 x 4 matrix
    products in half precision)."""
    step = net if isinstance(net, _Step | torch.nn.parallel.DistributedDataParallel) else _Step(net)
    inner = step.module.net if isinstance(step, torch.nn.parallel.DistributedDataParallel) else step.net
    video = batch["video"]
    with torch.autocast(video.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        raw = step(
            batch["global_frames"], batch["global_positions"], video, batch["positions"], batch.get("code")
        )
    pred = pose9_to_matrix(raw.float(), inner.cfg)
    return clip_loss(pred, batch["local"].float(), batch["points"].float(), cfg.loss)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """A run folder with a checkpoint is continued only on request, never overwritten."""
    last_path = Path(run_dir) / "last.pt"
    if last_path.exists() and not resume:
        raise FileExistsError(f"{last_path} exists: resume it (--resume) or choose another output folder")


def data_counts(scans: list, prefix: str) -> dict:
    """How much data a member saw, for its manifest entry: scan and frame counts."""
    return {f"{prefix}_scans": len(scans), f"{prefix}_frames": int(sum(s.n_frames for s in scans))}


def cache_steps(cfg: TrainConfig) -> tuple[int, ...]:
    """Frame steps whose decorrelation maps a run needs (sampler.decorrelation_frame_steps
    of its channels and frame skip); none without decorrelation."""
    return decorrelation_frame_steps(len(cfg.model_config.frame_steps), cfg.augment.frame_skip)


def _rng_states(sampler_rng: np.random.Generator) -> dict:
    return {
        "sampler": sampler_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }


def _save_checkpoint(path: Path, net, opt, step, best, cfg, sampler_rng, extra: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "best": best,
            "config": cfg.to_dict(),
            "rng": _rng_states(sampler_rng),
            **extra,
        },
        tmp,
    )
    tmp.replace(path)
    cfg.save(path.parent / "config.json")


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def _batches(sampler: ClipSampler, cfg: TrainConfig, start: int, ctx: Context, workers: int, pin: bool):
    """The batches of steps start..cfg.steps-1, in order (see TrainConfig.sampling).

    per-clip: this process's clips of each step, drawn ahead of the loop by ``workers``
    DataLoader worker processes (none: in the loop). sequential: the sampler's own
    generator, in the loop (its state is what the checkpoints save)."""
    if cfg.sampling == "sequential":
        while True:
            yield sampler.batch(cfg.batch_size)
    dataset = StepBatches(sampler, cfg.seed, cfg.steps, ctx.clips(cfg.batch_size), cfg.clip_frames_at)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item is already a batch
        sampler=range(start, cfg.steps),
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def train_member(
    data_root: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    name: str = "member0",
    progress: bool = True,
    resume: bool = False,
    device: str | None = None,
    weights_dir: str | Path | None = None,
    data: TrainData | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    amp: bool | None = None,
    max_seconds: float | None = None,
) -> dict:
    """Train one member on a TRAIN-layout folder; returns its weights manifest entry.

    ``data``: the folder already cached (load_cache with cache_steps(config)), to share
    one cache between members. ``cache_dir``: keep the preprocessed scans on disk there,
    memory-mapped (cache.cached_scan_input), for reruns and parallel processes.
    ``workers``: DataLoader worker processes drawing the clips ahead of the training loop
    (per-clip sampling; the result does not depend on it). ``amp``: mixed precision on a
    GPU (amp_dtype; default on there, never on the CPU). ``max_seconds``: stop once this
    call has trained that long, as if interrupted (validated and checkpointed there;
    ``resume`` continues): for time-boxed runs and benchmarks.

    Resumes from out_dir/last.pt with ``resume`` (the step, optimiser and rng states
    continue; ``config.steps`` may be raised); without it an existing last.pt is an error.
    The best checkpoint (lowest validation GPE; the last one without validation) is
    saved as member ``name`` in ``weights_dir`` (default out_dir/weights).

    Under torchrun (distributed.context) every process trains its share of each batch;
    only rank 0 writes files, and only it gets the manifest entry (the others get {}).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    weights_dir = Path(weights_dir) if weights_dir else out_dir / "weights"
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.csv"
    ctx = context(pick_device(device))
    device = ctx.device
    cfg = config
    mcfg = cfg.model_config
    if cfg.sampling == "sequential" and ctx.distributed:
        raise TrainError("sampling 'sequential' draws every clip in one process: use 'per-clip' with DDP")
    ctx.clips(cfg.batch_size)  # a batch that does not split over the processes: fail now
    amp_type = amp_dtype(device) if amp is not False else None
    if amp and amp_type is None:
        raise TrainError("mixed precision (amp) needs a CUDA device")
    progress = progress and ctx.main

    checkpoint = None
    _check_run_dir(out_dir, resume)
    if last_path.exists():
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        # Through ModelConfig, so a checkpoint written before a key with a default existed
        # (scan_conditioning) still resumes.
        if ModelConfig.from_dict(checkpoint["config"]["model"]) != mcfg:
            raise TrainError(f"{last_path}: the model configuration differs from the checkpoint's")
        if checkpoint["config"].get("sampling", "sequential") != cfg.sampling:
            raise TrainError(f"{last_path}: the checkpoint's clip sampling differs from the config's")
    ctx.barrier()  # every process has read the run folder before rank 0 writes to it
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if data is None:
        data = load_shared_cache(
            data_root, cfg, ctx, progress, cache_dir or (out_dir / "cache" if ctx.distributed else None)
        )
    train_subjects, val_subjects = split_subjects(data.subjects, cfg.val_subjects, cfg.seed)
    train_scans, val_scans = data.of_subjects(train_subjects), data.of_subjects(val_subjects)
    T_scale = data.calib.T_scale
    sampler_rng = np.random.default_rng(cfg.seed)
    sampler = ClipSampler(
        train_scans,
        cfg.longest_clip,
        mcfg.global_frames,
        cfg.augment,
        T_scale,
        sampler_rng,
        len(mcfg.frame_steps),
        mcfg.scan_conditioning,
        cfg.rotation_share,
    )

    net = build_network(mcfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # float16 needs its gradients scaled (bfloat16 has float32's range and does not).
    scaler = torch.amp.GradScaler("cuda") if amp_type == torch.float16 else None
    step, best, seconds = 0, math.inf, 0.0
    # The step totals this run has gone through: a continuation with a larger
    # config.steps restarts the cosine schedule, so replaying a member needs them all.
    schedule = [] if checkpoint is None else list(checkpoint.get("schedule", [checkpoint["config"]["steps"]]))
    if not schedule or schedule[-1] != cfg.steps:
        schedule.append(cfg.steps)
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        step, best, seconds = checkpoint["step"], checkpoint["best"], checkpoint.get("seconds", 0.0)
        sampler_rng.bit_generator.state = checkpoint["rng"]["sampler"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    if ctx.main:
        cfg.save(out_dir / "config.json")
    step_module: torch.nn.Module = _Step(net)
    if ctx.distributed:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )

    t0 = time.perf_counter() - seconds
    started = time.perf_counter()
    net.train()
    running: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", unit="step", disable=not progress)
    batches = _batches(sampler, cfg, step, ctx, workers, pin=device.type == "cuda")
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = _to_torch(next(batches), device)
        terms = training_step(step_module, batch, cfg, amp_type)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
        else:
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        step += 1
        bar.update(1)
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + v.item()
        running["n"] = running.get("n", 0) + 1
        stop = max_seconds is not None and ctx.any(time.perf_counter() - started >= max_seconds)
        validate_now = step % cfg.val_every == 0 or step == cfg.steps or stop
        if step % LOG_EVERY == 0 or validate_now:
            n = running.pop("n")
            # Each process's mean over its clips, averaged: the mean over the global batch.
            loss, points, drift = ctx.mean([running["loss"] / n, running["points"] / n, running["drift"] / n])
            row = {
                "step": step,
                "loss": loss,
                "points_mm": points,
                "drift_mm": drift,
                "lr": lr,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            running = {}
            if validate_now:
                metric = row["loss"]
                if val_scans:
                    row.update(validate(net, val_scans, T_scale, device, ctx))
                    metric = row["val_GPE"]
                extra = {
                    "seconds": row["seconds"],
                    "frames_seen": cfg.batch_size * sum(map(cfg.clip_frames_at, range(step))),
                    "schedule": schedule,
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                }
                if metric < best or not val_scans:
                    best = metric if val_scans else math.inf
                    if ctx.main:
                        _save_checkpoint(best_path, net, opt, step, best, cfg, sampler_rng, {**extra, **row})
                if ctx.main:
                    _save_checkpoint(last_path, net, opt, step, best, cfg, sampler_rng, extra)
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{row[k]:.3f}" for k in row if "val" in k})
            if ctx.main:
                _append_log(log_path, row)
        if stop:
            break
    bar.close()
    batches.close()  # stops the data-loader workers
    ctx.barrier()  # the checkpoints are written before anyone reads them
    if not ctx.main:
        return {}

    best_ckpt = torch.load(
        best_path if best_path.exists() else last_path, map_location="cpu", weights_only=False
    )
    net.load_state_dict(best_ckpt["model"])
    metrics = {k: best_ckpt[k] for k in ("val_GPE", "val_LPE") if k in best_ckpt}
    if val_scans:
        # The identity on the same subjects: val_GPE / this is the share of the no-motion
        # error left (a seed on the plateau stays near 1; bagged members validate on
        # different subjects, so only the ratio compares them).
        metrics["val_identity_GPE"] = identity_gpe(val_scans, T_scale)
    info = {
        "trained": {
            "data_root": str(Path(data_root).resolve()),
            "train_subjects": train_subjects,
            "val_subjects": val_subjects,
            **data_counts(train_scans, "train"),
            **data_counts(val_scans, "val"),
            "frames_seen": best_ckpt.get("frames_seen", 0),
            "steps": best_ckpt["step"],
            "schedule": best_ckpt.get("schedule", [cfg.steps]),
            "seconds": best_ckpt.get("seconds", 0.0),
            "config": cfg.to_dict(),
        },
        "metrics": metrics,
    }
    return save_member(weights_dir, name, net.cpu(), info)


def load_shared_cache(
    data_root: str | Path, cfg: TrainConfig, ctx: Context, progress: bool, cache_dir: str | Path | None
) -> TrainData:
    """load_cache for a run; under DDP rank 0 builds the on-disk cache while the others
    wait, then they map the same files."""
    size, steps = cfg.model_config.input_size, cache_steps(cfg)
    if ctx.distributed and not ctx.main:
        ctx.barrier()
        return load_cache(data_root, size, None, False, steps, cache_dir)
    data = load_cache(data_root, size, None, progress, steps, cache_dir)
    if ctx.distributed:
        ctx.barrier()
    return data


def train_ensemble(
    data_root: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    members: int = 1,
    name: str = "member0",
    progress: bool = True,
    resume: bool = False,
    device: str | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    schedule: list[int] | None = None,
    workers: int = 2,
    amp: bool | None = None,
    max_seconds: float | None = None,
) -> list[dict]:
    """Train ``members`` members on one shared cache; returns their manifest entries
    (empty dicts on the processes other than rank 0 under DDP).

    One member: run folder ``out_dir``, member ``name`` (train_member). Several: member
    i is ``<name>i`` with seed config.seed + i, run folder out_dir/<name>i; all are saved
    in ``weights_dir`` (default out_dir/weights). ``schedule``: step totals to run through
    in turn, each continuing the last (as --resume --steps N did; trained.schedule of a
    manifest entry), for replaying a member; default [config.steps]. The data are read
    once. ``workers``, ``amp``, ``max_seconds``: as for train_member (the time limit
    counts per member and continuation).
    """
    import dataclasses

    out_dir = Path(out_dir)
    weights_dir = Path(weights_dir) if weights_dir else out_dir / "weights"
    names = [name] if members == 1 else [f"{name}{i}" for i in range(members)]
    run_dirs = [out_dir] if members == 1 else [out_dir / n for n in names]
    for run_dir in run_dirs:  # before reading the data, which can take long
        _check_run_dir(run_dir, resume)
    split_subjects(sorted({s.subject for s in open_data(data_root).scans}), config.val_subjects, config.seed)
    ctx = context(pick_device(device))
    data = load_shared_cache(
        data_root, config, ctx, progress, cache_dir or (out_dir / "cache" if ctx.distributed else None)
    )
    entries = []
    for i in range(members):
        member_cfg = config if members == 1 else dataclasses.replace(config, seed=config.seed + i)
        member, run_dir = names[i], run_dirs[i]
        for k, steps in enumerate(schedule or [config.steps]):
            entry = train_member(
                data_root,
                run_dir,
                dataclasses.replace(member_cfg, steps=steps),
                member,
                progress,
                resume or k > 0,
                device,
                weights_dir,
                data,
                workers=workers,
                amp=amp,
                max_seconds=max_seconds,
            )
        entries.append(entry)
    return entries
