"""The ``tusrec`` command line: ``tusrec <command> --help`` for each command.

The root executables (``./landmarks`` ...) are this module under their own names.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tusrec.data import EVAL, TRAIN, TusrecDataError


def _subjects(text: str) -> list[int]:
    """'50,51' -> [50, 51]; '50-52' -> [50, 51, 52]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _image_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def _cluster_spec(text: str):
    """argparse type of --cluster (tusrec.cluster is imported only when it is given: the
    submission image has no Dask)."""
    from tusrec.cluster import ClusterError, parse_cluster

    try:
        return parse_cluster(text)
    except ClusterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_cluster_flag(p) -> None:
    p.add_argument(
        "--cluster",
        type=_cluster_spec,
        default=None,
        metavar="local:N|tcp://HOST:PORT",
        help="run one unit per scan on Dask: N worker processes here (local:N) or an existing "
        "scheduler's workers (tcp://HOST:PORT) (default: in this process)",
    )


def _on_cluster(spec, work, gpu_slots: bool = False):
    """work(client) on the cluster of ``spec``; a cluster that cannot be used exits 2."""
    from tusrec import cluster

    try:
        with cluster.connect(spec, gpu_slots) as client:
            return work(client)
    except cluster.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_keys_and_chunk(p) -> None:
    p.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    p.add_argument("--chunk", type=int, default=16, help="frames per chunk (default 16)")


def add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="write synthetic freehand scans in the real TUS-REC layout",
        description="Simulate freehand forearm sweeps (2024 protocol) or rotation scans "
        "(2025 protocol) and write them as a TUS-REC data folder, with calib_matrix.csv, "
        "SIFT landmark files and (val/test layout) dataset_keys.h5. Synthetic data: "
        "label any result on it as synthetic.",
    )
    p.add_argument("out", type=Path, help="data folder to write (created; complete scans are kept)")
    p.add_argument("--subjects", type=_subjects, default=[50], help="e.g. 50,51 or 0-9 (default 50)")
    p.add_argument("--protocol", choices=["2024", "2025"], default="2024")
    p.add_argument(
        "--layout",
        choices=["train", "val", "test"],
        default="val",
        help="train: frames_transfs/; val or test: frames/ + transfs/ (default val)",
    )
    p.add_argument("--frames", default="300", help="frames per scan: N or MIN-MAX (default 300)")
    p.add_argument(
        "--scans",
        default=None,
        help="comma-separated scan names (of either protocol: one command, one anatomy set-up "
        "per subject, for a folder of both), or a number n for the first n of --protocol "
        "(default: all 24 of 2024, both of 2025)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=_image_size, default=(480, 640), help="HxW (default 480x640)")
    p.add_argument("--no-landmarks", action="store_true", help="skip SIFT landmark extraction")
    p.add_argument("--k", type=int, default=None, help="landmarks per scan (default 20; 100 for 2025)")
    add_cluster_flag(p)
    p.set_defaults(run=run_simulate)


def run_simulate(args) -> int:
    from tusrec.simulate import scan_names
    from tusrec.simulate.dataset import simulate_dataset

    names = None
    if args.scans:
        all_names = scan_names(args.protocol)
        if args.scans.isdigit():
            names = all_names[: int(args.scans)]
        else:
            names = args.scans.split(",")
            unknown = sorted(set(names) - set(scan_names("2024")) - set(scan_names("2025")))
            if unknown:
                raise SystemExit(f"unknown scan names: {unknown} (neither protocol has them)")
    t0 = time.perf_counter()
    simulate = simulate_dataset
    if args.cluster is not None:

        def simulate(*a, **kw):
            return _on_cluster(args.cluster, lambda client: simulate_dataset(*a, **kw, client=client))

    keys = simulate(
        args.out,
        args.subjects,
        protocol=args.protocol,
        layout=TRAIN if args.layout == "train" else EVAL,
        frames=args.frames,
        names=names,
        seed=args.seed,
        image_size=args.image_size,
        landmarks=not args.no_landmarks,
        k=args.k,
    )
    print(
        f"wrote {len(keys)} synthetic scans ({args.protocol} protocol, {args.layout} layout) "
        f"to {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def add_landmarks(sub) -> None:
    p = sub.add_parser(
        "landmarks",
        help="extract SIFT landmarks into landmark_<sub>.h5 files",
        description="For each scan, the K SIFT keypoints with the highest response over "
        "frames 1..N-1 inside the field of view, written as landmark_<sub>.h5 (one (K,3) "
        "dataset per scan: 0-based frame index, 1-based x, y). Scans that already have "
        "landmarks are skipped unless --overwrite.",
    )
    p.add_argument("data", type=Path, help="TUS-REC data folder (either layout)")
    p.add_argument("--k", type=int, default=None, help="landmarks per scan (default 20; 100 for 2025 scans)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the landmark files (default: the data folder's landmark(s)/)",
    )
    p.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    p.add_argument("--overwrite", action="store_true", help="redo scans that already have landmarks")
    add_cluster_flag(p)
    p.set_defaults(run=run_landmarks)


def run_landmarks(args) -> int:
    from tusrec.data import open_data
    from tusrec.landmarks import write_data_landmarks

    data = open_data(args.data)
    if not data.scans:
        raise TusrecDataError(f"{args.data}: no scans found")
    if args.cluster is None:
        made = write_data_landmarks(
            data, k=args.k, out_dir=args.out, overwrite=args.overwrite, keys=args.keys
        )
    else:
        made = _on_cluster(
            args.cluster,
            lambda client: write_data_landmarks(
                data, k=args.k, out_dir=args.out, overwrite=args.overwrite, keys=args.keys, client=client
            ),
        )
    skipped = len(args.keys or data.scans) - len(made)
    where = args.out or (data.root / data.landmark_path("000").parent.name)
    print(f"landmarks: {len(made)} scans extracted, {skipped} already done, in {where}")
    return 0


def add_reference(sub) -> None:
    p = sub.add_parser(
        "reference",
        help="write reference predictions (ground truth or identity) in the predictions format",
        description="Write a predictions folder (<key>.h5 + predictions.csv) of a reference "
        "method: 'ground-truth' computes each scan's true GP/GL/LP/LL from its tforms and the "
        "calibration (docs/conventions.md section 2; scoring it gives 0), 'identity' predicts no motion "
        "(all-zero DDFs; the 2025 normalisation's reference, and needs no ground truth). "
        "Streamed in frame chunks; complete files are kept on a rerun.",
    )
    p.add_argument("kind", choices=["ground-truth", "identity"])
    p.add_argument("data", type=Path, help="TUS-REC data folder (ground-truth needs its tforms)")
    p.add_argument("--out", type=Path, required=True, help="predictions folder to write")
    _add_format(p)
    _add_keys_and_chunk(p)
    p.set_defaults(run=run_reference)


def run_reference(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from tusrec.data import open_data, write_manifest
    from tusrec.ddf import GroundTruth, write_predictions

    data = open_data(args.data)
    scans = data.select(args.keys)
    if not scans:
        raise TusrecDataError(f"{args.data}: no scans found")
    calib = data.calibration
    total_bytes = 0
    rows = []
    for scan in tqdm(scans, desc=args.kind, unit="scan", disable=None):
        path = args.out / f"{scan.key}.h5"
        t0 = time.perf_counter()
        if not path.exists():
            if args.kind == "ground-truth":
                gt = GroundTruth.from_scan(scan, calib)
                glob, local = gt.global_, gt.local
            else:
                glob = local = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
            landmarks = scan.read_landmarks() if scan.has_landmarks else None
            attrs = {"model": args.kind, "runtime_seconds": time.perf_counter() - t0}
            write_predictions(
                path,
                glob,
                local,
                calib,
                scan.image_size,
                landmarks,
                attrs,
                chunk=args.chunk,
                form=args.format,
            )
        total_bytes += path.stat().st_size
        message = "" if scan.has_landmarks else "no landmarks: GL/LL not written"
        rows.append(
            {
                "key": scan.key,
                "frames": scan.n_frames,
                "status": "ok",
                "seconds": time.perf_counter() - t0,
                "device": "cpu",
                "message": message,
            }
        )
    write_manifest(args.out, rows)
    print(f"{args.kind}: {len(scans)} scans, {total_bytes / 1e9:.2f} GB in {args.out}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict GP/GL/LP/LL for every scan of a folder (the submission entrypoint)",
        description="Read a folder of scans in the validation/test layout (either edition) "
        "and write a predictions folder (<key>.h5 + predictions.csv) with the ensemble in "
        "--weights, within --time-limit seconds a scan: members that would not finish are "
        "skipped, and if none can, the identity motion is written and the manifest says so. "
        "Complete predictions of an earlier run are kept; partial files are redone.",
    )
    p.add_argument("--input", type=Path, default=Path("/input"), help="data folder (default /input)")
    p.add_argument(
        "--output", type=Path, default=Path("/output"), help="predictions folder (default /output)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="ensemble folder (default: the shipped weights/)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per scan (default 120)")
    p.add_argument(
        "--translation", choices=["mean", "median"], default="mean", help="combine translations by"
    )
    p.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    p.add_argument(
        "--members", nargs="+", default=None, help="only these members of the weights manifest (default all)"
    )
    from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES

    p.add_argument(
        "--in-plane",
        choices=IN_PLANE_SOURCES,
        default=DEFAULT_IN_PLANE,
        help="where the in-plane motion (tx, ty, rz) comes from: the members' estimate, or "
        "registration of each frame onto the one before, started from it "
        f"(default {DEFAULT_IN_PLANE})",
    )
    _add_format(p)
    p.set_defaults(run=run_predict)


def _add_format(p) -> None:
    p.add_argument(
        "--format",
        choices=["transforms", "ddf"],
        default="transforms",
        help="'transforms' (default): the compact form, per scan the (N-1, 4, 4) transforms and "
        "GL/LL, kilobytes, scored exactly as the dense DDFs they stand for; 'ddf': dense GP/LP "
        "as well, the challenge's official form (1.1 GB a 150-frame scan, 12 GB at 1,600)",
    )


def run_predict(args) -> int:
    from tusrec.model.ensemble import WeightsError
    from tusrec.predict import DEFAULT_WEIGHTS, predict_folder

    try:
        rows = predict_folder(
            args.input,
            args.output,
            args.weights or DEFAULT_WEIGHTS,
            args.device,
            args.time_limit,
            args.keys,
            args.translation,
            members=args.members,
            form=args.format,
            in_plane=args.in_plane,
        )
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r["key"] for r in rows if r["status"] != "ok"]
    print(f"predict: {len(rows) - len(failed)} of {len(rows)} scans predicted into {args.output}")
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.output / 'predictions.csv'})", file=sys.stderr)
        return 1
    return 0


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train ensemble members on a training-layout folder",
        description="Train one ensemble member (or --members M of them, seeds seed..seed+M-1, "
        "on one shared cache) on a TUS-REC folder in the training layout (frames_transfs/), "
        "holding out validation subjects as the config says. A run folder gets config.json, "
        "last.pt, best.pt and log.csv; the best checkpoint is saved as a member in the "
        "weights folder (manifest.json). --config takes a TrainConfig JSON file or a weights "
        "manifest, whose member --name is then retrained with the config it was trained "
        "with, through each continuation it went through (trained.schedule). "
        "An interrupted run continues from last.pt with --resume. On N GPUs (or N CPU "
        "processes, gloo): torchrun --nproc-per-node N -m tusrec train ... (DDP; the config's "
        "batch_size is the global batch, split over the processes).",
    )
    p.add_argument("data", type=Path, help="training data folder (frames_transfs/ layout)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, weights/)")
    p.add_argument("--config", type=Path, required=True, help="TrainConfig JSON, or a weights manifest.json")
    p.add_argument(
        "--name", default="member0", help="member name (default member0); the prefix with --members"
    )
    p.add_argument("--members", type=int, default=1, help="train M members, <name>0..<name>M-1 (default 1)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the config's step count (one run; no schedule replay)",
    )
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default --out/weights)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument(
        "--cache", type=Path, default=None, help="keep the preprocessed scans here (reused by later runs)"
    )
    p.add_argument(
        "--val-subjects",
        default=None,
        help="override the config's validation subjects: ids (e.g. 009 or 3,7) or a fraction (e.g. 0.1)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="data-loader processes drawing clips ahead of the training loop (default 2; "
        "the result does not depend on it)",
    )
    p.add_argument(
        "--fp32", action="store_true", help="no mixed precision on a GPU (default: bf16, else fp16 autocast)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop each run after this long, checkpointed (continue with --resume)",
    )
    p.set_defaults(run=run_train)


def _val_subjects(text: str) -> list[str] | float:
    """'009' or '3,7' -> subject ids; '0.1' -> a fraction."""
    if "." in text:
        return float(text)
    return [f"{int(s):03d}" for s in text.split(",")]


def run_train(args) -> int:
    import dataclasses

    from tusrec.train.config import TrainConfig, TrainError
    from tusrec.train.trainer import train_ensemble

    try:
        config = TrainConfig.load(args.config, member=args.name)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    if args.val_subjects is not None:
        try:
            config = dataclasses.replace(config, val_subjects=_val_subjects(args.val_subjects))
        except ValueError as err:
            print(f"error: --val-subjects {args.val_subjects}: {err}", file=sys.stderr)
            return 2
    if args.members < 1:
        print("error: --members must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # A member retrained from a manifest replays every continuation it went through
    # (each restarts the cosine schedule); --steps replaces that with one run.
    schedule = None if args.steps is not None else TrainConfig.schedule(args.config, args.name)
    try:
        entries = train_ensemble(
            args.data,
            args.out,
            config,
            args.members,
            args.name,
            resume=args.resume,
            device=args.device,
            weights_dir=args.weights,
            cache_dir=args.cache,
            schedule=schedule,
            workers=args.workers,
            amp=False if args.fp32 else None,
            max_seconds=args.max_seconds,
        )
    except (FileExistsError, TrainError) as err:  # a run folder, config or data mismatch
        print(f"error: {err}", file=sys.stderr)
        return 2
    weights = args.weights or args.out / "weights"
    for entry in entries:  # under DDP only rank 0 has the entries
        if entry:
            print(f"train: member {entry['name']} saved in {weights} ({entry.get('metrics', {})})")
    return 0


def add_error_head(sub) -> None:
    p = sub.add_parser(
        "error-head",
        help="fit the members' error heads (their per-frame expected error) after training",
        description="Fit the error head of trained members: a small head on each member's "
        "features, the rest of the network frozen, that predicts the member's expected error "
        "(mm) on every frame transition, so that ./predict can write a per-frame uncertainty "
        "that follows the error (expected_error_mm). Each member is fitted on the scans of the "
        "subjects it was trained on (its manifest entry's trained.train_subjects), run whole as "
        "the predictor runs them, and "
        "saved back into the weights folder with a new checksum; its poses are unchanged.",
    )
    p.add_argument("weights", type=Path, help="weights folder (manifest.json) of trained members")
    p.add_argument("data", type=Path, help="the training data folder the members were trained on")
    p.add_argument("--members", nargs="+", default=None, help="only these members (default all)")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps a member (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="the head's and its batches' seed (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="the preprocessed scans' cache (as for train)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.set_defaults(run=run_error_head)


def run_error_head(args) -> int:
    from tusrec.model.manifest import WeightsError
    from tusrec.train.config import TrainError
    from tusrec.train.error_head import DEFAULT_STEPS, fit_members
    from tusrec.train.trainer import pick_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        entries = fit_members(
            args.weights,
            args.data,
            args.members,
            args.steps or DEFAULT_STEPS,
            args.seed,
            device=pick_device(args.device),
            cache_dir=args.cache,
        )
    except (TrainError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for entry in entries:
        record = entry["error_head"]
        print(
            f"error-head: member {entry['name']} saved in {args.weights} ({record['transitions']} "
            f"transitions, {record['steps']} steps, {record['seconds']:.0f} s; its mean error "
            f"{record['mean_error_mm']:.3f} mm, expected {record['mean_expected_mm']:.3f} mm)"
        )
    return 0


def add_error_model(sub) -> None:
    p = sub.add_parser(
        "error-model",
        help="fit the ensemble's expected error from the registration residual (after training)",
        description="Fit the registered ensemble's per-frame expected error (mm) from how unlike "
        "each frame is the one before once the registered in-plane motion is taken out "
        "(tusrec.model.error_model: log-linear, per kind of scan). Every scan of the given "
        "subjects is predicted as ./predict predicts it and compared with its ground truth; the "
        "subjects must be held out from every member's training (the validation subjects). "
        "Writes error_model.json into the weights folder, which ./predict then uses for that "
        "ensemble; prints each subject's Spearman rho when the model is fitted on the others.",
    )
    p.add_argument("weights", type=Path, help="weights folder (manifest.json) of trained members")
    p.add_argument("data", type=Path, nargs="+", help="data folder(s) (train layout) holding the subjects")
    p.add_argument("--subjects", required=True, help="held-out subjects, e.g. 011,012")
    p.add_argument("--in-plane", default=None, help="the registration source (default: ./predict's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.set_defaults(run=run_error_model)


def run_error_model(args) -> int:
    from tusrec.data import TusrecDataError
    from tusrec.model.manifest import WeightsError
    from tusrec.train.error_model import fit_for_weights

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    try:
        model, report = fit_for_weights(
            args.weights,
            args.data,
            subjects,
            args.in_plane,
            args.device,
            log=lambda line: print(f"error-model: {line}"),
        )
    except (WeightsError, TusrecDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {n}" for k, n in model.transitions.items())
    print(f"error-model: saved in {args.weights} ({report['scans']} scans; transitions: {counts})")
    for subject, r in report["held_out"].items():
        print(
            f"error-model: subject {subject} held out: rho {r['spearman_rho']:.3f} over its transitions, "
            f"median per scan {r['per_scan_rho_median']:.3f} ({r['scans']} scans)"
        )
    return 0


def add_weights(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="list the members of a weights folder with their training and held-out metrics",
        description="List the members of a weights folder (manifest.json, checksums verified): "
        "architecture, seed, training steps and time, validation GPE/LPE, and the share of "
        "the identity's GPE on the same scans (whether the member left the no-motion plateau). "
        "With --best, print only the name of the best member by validation; with --export DIR, "
        "copy the --top N best (default all) into a new weights folder. Best: the lowest share "
        "of the identity's GPE when every member records it (bagged members validate on "
        "different subjects), else the lowest validation GPE.",
    )
    p.add_argument("folder", type=Path, nargs="?", default=None, help="weights folder (default: shipped)")
    p.add_argument("--best", action="store_true", help="print the best member's name only")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="copy members into a new folder")
    p.add_argument(
        "--top", type=int, default=None, metavar="N", help="with --export: the N best (default all)"
    )
    p.set_defaults(run=run_weights)


def run_weights(args) -> int:
    # Listing and --best read the manifest and verify the checksums without torch (a
    # fraction of a second); only --export goes through the ensemble module.
    from tusrec.model.manifest import (
        DEFAULT_WEIGHTS,
        PLATEAU_RATIO,
        WeightsError,
        checked_entries,
        validation_key,
        validation_ratio,
    )

    folder = args.folder or DEFAULT_WEIGHTS
    if args.top is not None and args.export is None:
        print("error: --top needs --export", file=sys.stderr)
        return 2
    try:
        if args.export is not None:
            from tusrec.model.ensemble import export_members

            names = export_members(folder, args.export, args.top)
            print(f"exported {', '.join(names)} (best by validation first) to {args.export}")
            return 0
        entries = checked_entries(folder)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.best:
        print(min(entries, key=validation_key(entries))["name"])
        return 0
    print(f"{folder}: {len(entries)} member(s), checksums verified")
    for entry in entries:
        trained = entry.get("trained", {})
        trained = trained if isinstance(trained, dict) else {}
        metrics = entry.get("metrics", {})
        seed = trained.get("config", {}).get("seed", "?")
        minutes = trained.get("seconds", float("nan")) / 60
        scores = ", ".join(f"{k} {v:.3f} mm" for k, v in metrics.items()) or "no validation metrics"
        ratio = validation_ratio(entry)
        if ratio is not None:
            # The convergence criterion: at least 30 % below the identity's GPE.
            verdict = "left the no-motion plateau" if ratio <= PLATEAU_RATIO else "ON THE NO-MOTION PLATEAU"
            scores += f" ({ratio:.2f} of the identity's GPE: {verdict})"
        architecture = entry.get("config", {}).get("architecture", "dual-encoder")
        head = entry.get("error_head")
        head = f", error head ({head.get('steps', '?')} steps)" if isinstance(head, dict) else ""
        print(
            f"  {entry['name']}: {architecture}, seed {seed}, {trained.get('steps', '?')} steps "
            f"in {minutes:.0f} min, {scores}{head}"
        )
    from tusrec.model.error_model import ERROR_MODEL, load_error_model

    try:
        model = load_error_model(folder)
    except WeightsError as err:
        print(f"  {ERROR_MODEL}: unusable ({err})")
        return 0
    if model is not None:
        used = "used with registration" if model.fits(entries) else "NOT for these members: not used"
        print(
            f"  {ERROR_MODEL}: expected error from the registration residual, fitted on subject(s) "
            f"{', '.join(model.subjects)} ({model.transitions.get('any', 0)} transitions); {used}"
        )
    return 0


def add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="list and validate the scans of a data folder",
        description="List every scan of a TUS-REC data folder with its pattern, frame "
        "count, image size, ground truth and landmarks, validating each file (frames, "
        "tforms, landmarks, calibration). Exit status 1 if anything is invalid.",
    )
    p.add_argument("data", type=Path, help="TUS-REC data folder (either layout)")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from tusrec.data import open_data

    data = open_data(args.data)
    calib = data.calibration
    sx, sy = calib.pixel_spacing_mm
    print(f"{data.root}: {data.layout} layout, {len(data.scans)} scans, pixel spacing {sx:.4f} x {sy:.4f} mm")
    problems = 0
    print(
        f"{'key':34} {'protocol':8} {'arm':3} {'orient':6} {'shape':5} {'dir':3} "
        f"{'frames':>6} {'HxW':>7} {'tforms':6} {'K':>4}"
    )
    for scan in data.scans:
        pat = scan.pattern
        try:
            n, h, w = scan.shape
            tforms = "yes" if scan.has_tforms else "-"
            if scan.has_tforms:
                scan.read_tforms()
            k = str(len(scan.read_landmarks())) if scan.has_landmarks else "-"
        except TusrecDataError as err:
            problems += 1
            print(f"{scan.key:34} INVALID: {err}")
            continue
        print(
            f"{scan.key:34} {pat.protocol:8} {pat.arm or '-':3} {pat.orientation or '-':6} "
            f"{pat.shape or '-':5} {pat.direction or '-':3} {n:6d} {f'{h}x{w}':>7} {tforms:6} {k:>4}"
        )
    return 1 if problems else 0


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="validate and score predictions against ground truth",
        description="The organisers' evaluation: `check` validates a predictions folder "
        "against a data folder; `score` computes per-scan GPE, GLE, LPE, LLE and runtime; "
        "`rank` ranks teams from their scores and analyses the ranking; `run` runs team images "
        "in containers, scores and ranks them; `show` draws trajectories and reconstructions.",
    )
    ev = p.add_subparsers(dest="evaluate_command", required=True, metavar="command")
    check = ev.add_parser(
        "check",
        help="validate a predictions folder before scoring",
        description="Check that every scan has a prediction file with the right datasets, "
        "shapes and dtype, finite values, no extra files, and a consistent manifest. "
        "Lists every problem, file by file; exit status 1 if there is any.",
    )
    check.add_argument("predictions", type=Path, help="predictions folder (<key>.h5 + predictions.csv)")
    check.add_argument("--data", type=Path, required=True, help="the data folder the predictions are for")
    check.add_argument("--no-values", action="store_true", help="skip the NaN/Inf pass over the arrays")
    check.set_defaults(run=run_evaluate_check)
    score = ev.add_parser(
        "score",
        help="per-scan GPE, GLE, LPE, LLE and runtime",
        description="Score every scan of DATA (which needs ground truth: transfs/ or the "
        "training layout). Writes metrics.csv (errors, identity errors, pattern, scan "
        "length, status) and the organisers' metrics.h5 into --out. A scan that failed, "
        "timed out or cannot be scored keeps its row with a status and no numbers.",
    )
    score.add_argument("predictions", type=Path, help="predictions folder")
    score.add_argument("--data", type=Path, required=True, help="data folder with ground truth")
    score.add_argument("--out", type=Path, required=True, help="folder for metrics.csv and metrics.h5")
    _add_keys_and_chunk(score)
    add_cluster_flag(score)
    score.set_defaults(run=run_evaluate_score)
    rank = ev.add_parser(
        "rank",
        help="rank teams from their metrics.csv and analyse how stable the ranking is",
        description="Rank teams from the per-scan tables of `score` (docs/conventions.md section 4): "
        "per-scan normalisation, FS/GS/LS/PS/LMS, aggregate then rank (ties by runtime); scan- and "
        "subject-level bootstrap (blob plot, Kendall's tau), sampling distributions, one-sided "
        "Wilcoxon tests (Holm), breakdowns by scan pattern and scan length, and the ranking under "
        "other methods. Writes leaderboard.csv/.md, CSV tables, PNG figures and a self-contained "
        "report.html into --out.",
    )
    rank.add_argument(
        "--team",
        action="append",
        required=True,
        metavar="NAME=METRICS",
        help="a team's metrics.csv (or the --out folder of `score`); repeat for every team",
    )
    rank.add_argument("--out", type=Path, required=True, help="folder for the report (created)")
    rank.add_argument(
        "--normalisation",
        choices=["minmax", "identity"],
        default=None,
        help="minmax (2024) or identity (2025); default: identity if every scan is a 2025 scan",
    )
    rank.add_argument("--bootstrap", type=int, default=2000, help="resamples per level (default 2000)")
    rank.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    rank.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    rank.add_argument("--title", default=None, help="report title (default 'TUS-REC ranking')")
    rank.add_argument(
        "--synthetic", action="store_true", help="label every figure and the report SYNTHETIC DATA"
    )
    rank.add_argument(
        "--continuity-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Wilcoxon tests: normal approximation with the continuity correction (default, as "
        "challengeR: R's wilcox.test(exact = FALSE, correct = TRUE)), or without it",
    )
    rank.add_argument(
        "--predictions",
        action="append",
        default=None,
        metavar="TEAM=DIR",
        help="a ranked team's predictions folder, for a qualitative section drawing its best, median "
        "and worst scan (needs --data); repeat per team",
    )
    rank.add_argument(
        "--data", type=Path, default=None, help="data folder with ground truth (for --predictions)"
    )
    rank.set_defaults(run=run_evaluate_rank)
    add_evaluate_run(ev)
    add_evaluate_show(ev)


# The defaults of tusrec.show (command.DEFAULT_MAX_SCANS and volume.DEFAULT_*), written out
# because the submission image has no tusrec.show to import (tests check they agree).
SHOW_MAX_SCANS, SHOW_VOXEL_MM, SHOW_MAX_VOXELS, SHOW_PIXEL_STEP = 6, 0.5, 2**24, 2


def add_evaluate_show(ev) -> None:
    DEFAULT_MAX_SCANS, DEFAULT_VOXEL_MM = SHOW_MAX_SCANS, SHOW_VOXEL_MM
    DEFAULT_MAX_VOXELS, DEFAULT_PIXEL_STEP = SHOW_MAX_VOXELS, SHOW_PIXEL_STEP
    show = ev.add_parser(
        "show",
        help="trajectories and reconstructed volumes per scan (PNGs and show.html)",
        description="For each chosen scan of DATA (with ground truth): the trajectory (the four "
        "image corners of every frame in 3D, true against predicted, in the first frame's image "
        "mm; per-frame GPE and LPE; the file's per-frame uncertainty) and the reconstruction (the "
        "frames compounded into one voxel volume with the true and with the predicted poses, as "
        "maximum-intensity projections side by side). Dense files are shown through a rigid fit "
        "of each frame's DDF (residual reported), compact files through their matrices. Writes "
        "<key>_trajectory.png, <key>_reconstruction.png, show.csv and a self-contained show.html "
        "into --out. Conventions: docs/conventions.md.",
    )
    show.add_argument("predictions", type=Path, help="predictions folder (<key>.h5, dense or compact)")
    show.add_argument("--data", type=Path, required=True, help="data folder with ground truth")
    show.add_argument("--out", type=Path, required=True, help="folder for the figures and show.html")
    show.add_argument("--scans", nargs="+", default=None, metavar="KEY", help="only these scan keys")
    show.add_argument(
        "--max-scans",
        type=int,
        default=DEFAULT_MAX_SCANS,
        help=f"without --scans: all scans if at most this many, else the ones with the largest GPE "
        f"(default {DEFAULT_MAX_SCANS})",
    )
    show.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics.csv of `evaluate score` to pick the worst scans by (default: measure every file)",
    )
    show.add_argument(
        "--voxel-mm",
        type=float,
        default=DEFAULT_VOXEL_MM,
        help=f"voxel edge (default {DEFAULT_VOXEL_MM} mm; grown when the grid would exceed --max-voxels)",
    )
    show.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        help=f"voxel budget (default {DEFAULT_MAX_VOXELS:,})",
    )
    show.add_argument(
        "--pixel-step",
        type=int,
        default=DEFAULT_PIXEL_STEP,
        help=f"compound every n-th row and column of pixels (default {DEFAULT_PIXEL_STEP})",
    )
    show.add_argument("--title", default=None, help="page title")
    show.add_argument(
        "--synthetic", action="store_true", help="label every figure and the page SYNTHETIC DATA"
    )
    show.set_defaults(run=run_evaluate_show)


def run_evaluate_show(args) -> int:
    from tusrec.data import open_data
    from tusrec.show.command import show_predictions

    if args.max_scans < 1 or args.pixel_step < 1 or args.voxel_mm <= 0 or args.max_voxels < 1:
        print(
            "error: --max-scans, --pixel-step, --voxel-mm and --max-voxels must be positive", file=sys.stderr
        )
        return 2
    data = open_data(args.data)
    shown = show_predictions(
        args.predictions,
        data,
        args.out,
        args.scans,
        args.max_scans,
        args.metrics,
        args.synthetic,
        args.title,
        args.voxel_mm,
        args.max_voxels,
        args.pixel_step,
    )
    bad = [s for s in shown if s.trajectory is None]
    for s in shown:
        r = s.row
        if s.trajectory is None:
            print(f"{s.key}: not shown: {r['message']}", file=sys.stderr)
        else:
            print(f"{s.key}: {r['form']}, GPE {r['GPE']:.3f} mm, LPE {r['LPE']:.3f} mm, {r['seconds']:.1f} s")
    print(f"wrote {len(shown) - len(bad)} scan(s) to {args.out / 'show.html'}")
    return 1 if bad else 0


def add_evaluate_run(ev) -> None:
    run = ev.add_parser(
        "run",
        help="run every team's image on every scan in containers, score each scan, rank",
        description="The organisers' runner. For each scan of DATA (with ground truth) and each "
        "team image, through the Docker API (DOCKER_HOST is honoured): mount only that scan's "
        "frames, landmarks and calibration read-only at /input and an empty /output; no network, "
        "no added privileges, a memory limit, GPUs with --gpus; kill at --time-limit (status "
        "timeout); a non-zero exit is failed, unscorable output invalid or missing, /output over its "
        "quota invalid. Each scan is "
        "scored at once and its predictions deleted. Writes OUT/<team>/metrics.csv and "
        "metrics.h5 (as `evaluate score`), container logs in OUT/<team>/logs/, and ranks the "
        "teams into OUT/ranking/. A rerun skips scans already judged.",
    )
    run.add_argument(
        "--team",
        action="append",
        required=True,
        metavar="NAME=IMAGE",
        help="a team's image (loaded in the engine: docker load -i team.tar); repeat for every team",
    )
    run.add_argument("--data", type=Path, required=True, help="test/validation folder with ground truth")
    run.add_argument("--out", type=Path, required=True, help="folder for the teams' tables, logs, ranking")
    run.add_argument("--time-limit", type=float, default=120.0, help="seconds per scan (default 120)")
    run.add_argument("--memory", default="16g", help="memory limit per container (default 16g)")
    run.add_argument("--gpus", default=None, help="'all', a count or device=0,1 (default: no GPU)")
    run.add_argument("--user", default=None, help="run containers as UID:GID (default: the image's user)")
    run.add_argument(
        "--output-quota-margin",
        type=float,
        default=64.0,
        metavar="MB",
        help="/output may hold the scan's dense predictions (+5%%) plus this many MB; beyond it the "
        "container is killed and the scan is invalid (default 64)",
    )
    run.add_argument(
        "--tmp-size",
        default="1g",
        help="size of each tmpfs a container may write besides /output (/tmp, /var/tmp, /run, "
        "/dev/shm, the image's VOLUMEs; the root filesystem is read-only; counted against "
        "--memory) (default 1g)",
    )
    run.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    run.add_argument(
        "--keep-predictions", action="store_true", help="keep each team's files in OUT/<team>/predictions"
    )
    run.add_argument("--no-rank", action="store_true", help="only run and score; no ranking report")
    run.add_argument("--normalisation", choices=["minmax", "identity"], default=None, help="as for rank")
    run.add_argument("--bootstrap", type=int, default=2000, help="resamples per level (default 2000)")
    run.add_argument("--title", default=None, help="report title")
    run.add_argument("--synthetic", action="store_true", help="label the report SYNTHETIC DATA")
    add_cluster_flag(run)
    run.set_defaults(run=run_evaluate_run)


def run_evaluate_run(args) -> int:
    from tusrec.harness.runner import run_command

    return run_command(args)


def run_evaluate_rank(args) -> int:
    from tusrec.ranking.report import rank_command

    a = args
    return rank_command(
        a.team,
        a.out,
        a.normalisation,
        a.bootstrap,
        a.seed,
        a.alpha,
        a.title,
        a.synthetic,
        continuity_correction=a.continuity_correction,
        predictions=a.predictions,
        data_root=a.data,
    )


def _start_scoring_worker() -> None:
    """The bounded scoring worker's server imports numpy, h5py, pandas and the scoring
    code (1-2 s): started before this process imports the same, both run at once."""
    from tusrec.scoring import worker

    worker.SERVER.start()


def run_evaluate_check(args) -> int:
    _start_scoring_worker()
    from tusrec.data import open_data
    from tusrec.scoring import check_predictions

    data = open_data(args.data)
    problems = check_predictions(args.predictions, data, values=not args.no_values)
    for problem in problems:
        print(problem)
    if problems:
        keys = {p.key for p in problems}
        print(f"{len(problems)} problem(s) in {len(keys)} scan(s) or folder-level", file=sys.stderr)
        return 1
    print(f"{args.predictions}: predictions for all {len(data.scans)} scans are valid")
    return 0


def run_evaluate_score(args) -> int:
    if args.cluster is None:
        _start_scoring_worker()
    from tusrec.data import open_data
    from tusrec.scoring import score_predictions, summary

    data = open_data(args.data)
    if args.cluster is None:
        table = score_predictions(args.predictions, data, args.out, args.chunk, args.keys)
    else:
        table = _on_cluster(
            args.cluster,
            lambda client: score_predictions(
                args.predictions, data, args.out, args.chunk, args.keys, client=client
            ),
        )
    print(summary(table))
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'metrics.h5'}")
    return 0


COMMANDS = {
    "predict": add_predict,
    "evaluate": add_evaluate,
    "info": add_info,
    "train": add_train,
    "error-head": add_error_head,
    "error-model": add_error_model,
    "weights": add_weights,
    "simulate": add_simulate,
    "landmarks": add_landmarks,
    "reference": add_reference,
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``tusrec <command> ...``; with ``prog`` set to a command name, run that command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tusrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS.values():
        add(sub)
    if prog in COMMANDS:  # invoked as ./landmarks etc.: that command's own parser
        command_parser = sub.choices[prog]
        command_parser.prog = prog
        # its own subcommands were named 'tusrec evaluate rank' ...: as run, './evaluate rank'
        for action in command_parser._subparsers._group_actions if command_parser._subparsers else []:
            for name, child in getattr(action, "choices", {}).items():
                child.prog = f"{prog} {name}"
        args = command_parser.parse_args(argv)
    else:
        args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TusrecDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A folder that cannot be written (read-only, no permission, disk full) or read:
        # one line naming the path, as ./predict says it, for every command.
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2


def os_error_message(err: OSError) -> str:
    """'PATH: reason' of an OSError (h5py's carry no filename: their own message)."""
    if err.filename is not None and err.strerror:
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        return f"{where}: {err.strerror} (check that the folder exists and can be written)"
    return " ".join(str(err).split()) or type(err).__name__
