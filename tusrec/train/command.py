"""``tusrec train``, ``error-head``, ``error-model`` and ``weights``: the development
commands that make and inspect an ensemble (tusrec.train, tusrec.model)."""

from __future__ import annotations

import sys
from pathlib import Path

from tusrec.options import non_negative_int, positive_float, positive_int


def add_train(p) -> None:
    p.description = (
        "Train one ensemble member (or --members M of them, seeds seed..seed+M-1, "
        "on one shared cache) on a TUS-REC folder in the training layout (frames_transfs/), "
        "holding out validation subjects as the config says. A run folder gets config.json, "
        "last.pt, best.pt and log.csv; the best checkpoint is saved as a member in the "
        "weights folder (manifest.json). --config takes a TrainConfig JSON file or a weights "
        "manifest, whose member --name is then retrained with the config it was trained "
        "with, through each continuation it went through (trained.schedule). "
        "An interrupted run continues from last.pt with --resume. On N GPUs (or N CPU "
        "processes, gloo): torchrun --nproc-per-node N -m tusrec train ... (DDP; the config's "
        "batch_size is the global batch, split over the processes)."
    )
    p.add_argument("data", type=Path, help="training data folder (frames_transfs/ layout)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, weights/)")
    p.add_argument("--config", type=Path, required=True, help="TrainConfig JSON, or a weights manifest.json")
    p.add_argument(
        "--name",
        default="member0",
        help="member name; the prefix of the names with --members (default: %(default)s)",
    )
    p.add_argument(
        "--members",
        type=int,
        default=1,
        help="train M members, <name>0..<name>M-1, seeds seed..seed+M-1 (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="override the config's seed (default: the config's)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="override the config's step count: one run, no schedule replay (default: the config's)",
    )
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default --out/weights)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the preprocessed scans here, reused by later runs (default: in memory only; "
        "OUT/cache under torchrun)",
    )
    p.add_argument(
        "--val-subjects",
        default=None,
        help="override the config's validation subjects: ids (e.g. 009 or 3,7) or a fraction (e.g. 0.1) "
        "(default: the config's)",
    )
    add_threads_and_device(p)
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        help="data-loader processes drawing clips ahead of the training loop; the result does not "
        "depend on it (default: %(default)s)",
    )
    p.add_argument(
        "--fp32", action="store_true", help="no mixed precision on a GPU (default: bf16, else fp16 autocast)"
    )
    p.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help="stop each run after this many seconds, checkpointed (continue with --resume) "
        "(default: no limit)",
    )
    p.set_defaults(run=run_train)


def add_threads_and_device(p) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own choice)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ... (default: %(default)s)",
    )


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
    except OSError as err:
        print(f"error: --config {args.config}: {err.strerror or err}", file=sys.stderr)
        return 2
    except ValueError as err:
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


def add_error_head(p) -> None:
    p.description = (
        "Fit the error head of trained members: a small head on each member's "
        "features, the rest of the network frozen, that predicts the member's expected error "
        "(mm) on every frame transition, so that ./predict can write a per-frame uncertainty "
        "that follows the error (expected_error_mm). Each member is fitted on the scans of the "
        "subjects it was trained on (its manifest entry's trained.train_subjects), run whole as "
        "the predictor runs them, and "
        "saved back into the weights folder with a new checksum; its poses are unchanged."
    )
    p.add_argument("weights", type=Path, help="weights folder (manifest.json) of trained members")
    p.add_argument("data", type=Path, help="the training data folder the members were trained on")
    from tusrec.train.error_head import DEFAULT_STEPS

    p.add_argument(
        "--members", nargs="+", default=None, metavar="NAME", help="only these members (default: all)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help="AdamW steps a member (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="the head's and its batches' seed (default: %(default)s)"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="the preprocessed scans' cache, as for train (default: in memory only)",
    )
    add_threads_and_device(p)
    p.set_defaults(run=run_error_head)


def run_error_head(args) -> int:
    from tusrec.model.manifest import WeightsError
    from tusrec.train.config import TrainError
    from tusrec.train.error_head import fit_members
    from tusrec.train.trainer import pick_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        entries = fit_members(
            args.weights,
            args.data,
            args.members,
            args.steps,
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


def add_error_model(p) -> None:
    p.description = (
        "Fit the registered ensemble's per-frame expected error (mm) from how unlike "
        "each frame is the one before once the registered in-plane motion is taken out "
        "(tusrec.model.error_model: log-linear, per kind of scan). Every scan of the given "
        "subjects is predicted as ./predict predicts it and compared with its ground truth; the "
        "subjects must be held out from every member's training (the validation subjects). "
        "Writes error_model.json into the weights folder, which ./predict then uses for that "
        "ensemble; prints each subject's Spearman rho when the model is fitted on the others."
    )
    p.add_argument("weights", type=Path, help="weights folder (manifest.json) of trained members")
    p.add_argument("data", type=Path, nargs="+", help="data folder(s) (train layout) holding the subjects")
    p.add_argument("--subjects", required=True, help="held-out subjects, e.g. 011,012")
    from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES

    p.add_argument(
        "--in-plane",
        choices=[s for s in IN_PLANE_SOURCES if s != "network"],
        default=None,
        help=f"the registration source (default: ./predict's, {DEFAULT_IN_PLANE})",
    )
    add_threads_and_device(p)
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


def add_weights(p) -> None:
    p.description = (
        "List the members of a weights folder (manifest.json, checksums verified): "
        "architecture, seed, training steps and time, validation GPE/LPE, and the share of "
        "the identity's GPE on the same scans (whether the member left the no-motion plateau). "
        "With --best, print only the name of the best member by validation; with --export DIR, "
        "copy the --top N best (default all) into a new weights folder. Best: the lowest share "
        "of the identity's GPE when every member records it (bagged members validate on "
        "different subjects), else the lowest validation GPE."
    )
    p.add_argument(
        "folder",
        type=Path,
        nargs="?",
        default=None,
        help="weights folder (default: $TUSREC_WEIGHTS, else the shipped weights/)",
    )
    p.add_argument("--best", action="store_true", help="print the best member's name only")
    p.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy members, best first, into this new weights folder (default: list them only)",
    )
    p.add_argument(
        "--top", type=int, default=None, metavar="N", help="with --export: the N best (default: all)"
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
