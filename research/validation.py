"""Members and ensembles on the VALIDATION subject: what each recovers of each motion.

    python -m research.validation DATA --cache DIR --weights W1 [W2 ...] [--out F.json]

The tool for choosing levers (never the benchmark's subjects): every member of the
weights folders is run on the held-out validation scans of DATA (subject 011 unless
``--subjects``) as the predictor runs it (windowed inference, the scan name's code), and
for each member, for the mean of all and for the mean of the best k (by the manifests'
validation: ensemble.ranked_by_validation) it reports

* GPE and LPE (mm, mean over scans; the trainer's own validation numbers);
* per-DOF recovery of the frame-to-frame motion T(i->i-1): the slope of the predicted on
  the true component through the origin, sum(p t) / sum(t^2), for tx, ty, tz (mm) and
  rx, ry, rz (rotation vector, rad), per scan kind (Par and Per sweeps, rotation scans):
  1 = the motion is recovered, 0 = not at all, 0.45 = 45 % of it;
* the correlation of the members' frame-to-frame point errors (how alike their errors are),
  against the true motion and against its *observable* part (``research.observable``'s
  ``in-plane + named tz`` oracle: the in-plane motion, plus tz on the perpendicular
  sweeps, whose sign the name gives): out-of-plane motion that nothing signs is predicted
  as 0 by every member, an error they share by construction, which the second
  correlation leaves out;
* with ``--combo LABEL=NAME,NAME,...`` (repeatable), the mean of those members as well
  (names as printed: ``folder/name`` when several weights folders are given), to compare
  ensembles of other make-ups (more seeds, other architectures) on the same runs;
* with ``--registration``, the mean of all with its in-plane motion (tx, ty, rz) measured
  by registering each frame onto the one before, started from its own estimate
  (``tusrec.model.registration``, as the predictor runs it with ``--in-plane
  registration``; reads the scans' native frames), and the same with the network's tx
  kept on the parallel sweeps (``--in-plane registration-except-sweep``);
* with ``--scales``, the mean of all with its translations scaled (a post-hoc output
  scale, the cheapest correction of a shared error, if that error is a scale);
* GPE per scan kind, and GPE against the observable motion (``GPE_observable``): how far
  each model and mean is from that oracle, so whether averaging helps on the part of the
  error that is the members' own;
* for the mean of all, Spearman's rho between per-transition member disagreement and
  error (benchmarks.accuracy.uncertainty_rho, as the benchmark reports it), and when the
  members have error heads (tusrec.train.error_head) the same for the mean of their
  expected errors, and for each member its expected error against its own error.

``--fast`` skips the GPE/LPE (their dense pixel grids are most of the time) and the
per-DOF recovery: the disagreement-error rho and the error correlation only.

Prints a table and writes JSON. SYNTHETIC data only, as all of this kit's training data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DOFS = ("tx", "ty", "tz", "rx", "ry", "rz")


def dofs(local: np.ndarray) -> np.ndarray:
    """(N, 4, 4) rigid transforms -> (N, 6): translation (mm) and rotation vector (rad)."""
    from scipy.spatial.transform import Rotation

    local = np.asarray(local, np.float64)
    return np.concatenate([local[:, :3, 3], Rotation.from_matrix(local[:, :3, :3]).as_rotvec()], axis=1)


def recovery(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-column slope through the origin of pred on true: (N, D), (N, D) -> (D,)."""
    return (pred * true).sum(0) / np.maximum((true * true).sum(0), 1e-300)


def scan_kind(name: str) -> str:
    from tusrec.data import ScanPattern

    p = ScanPattern.from_name(name)
    if p.protocol == "2025":
        return "rotation"
    return p.orientation or "unknown"


def parse_combos(specs: list[str], names: list[str]) -> dict[str, list[str]]:
    """``["LABEL=a,b", ...]`` -> {LABEL: [a, b]}; every name must be one of ``names``."""
    combos = {}
    for spec in specs:
        label, sep, members = spec.partition("=")
        chosen = [n.strip() for n in members.split(",") if n.strip()]
        if not sep or not label or not chosen:
            raise SystemExit(f"--combo {spec!r}: expected LABEL=NAME,NAME,...")
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise SystemExit(
                f"--combo {label}: no member named {', '.join(unknown)} (members: {', '.join(names)})"
            )
        combos[label] = chosen
    return combos


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.accuracy import frame_point_errors, member_disagreement, uncertainty_rho
    from research.observable import in_plane, name_signs_tz
    from tusrec.data import ScanPattern, open_data, parse_scan_key
    from tusrec.geometry import compose_local
    from tusrec.model.ensemble import (
        combine,
        decorrelation_steps,
        load_members,
        members_outputs,
        ranked_by_validation,
    )
    from tusrec.model.inputs import scan_code
    from tusrec.model.registration import keeps_sweep_tx, register_in_plane, square_frames, with_in_plane
    from tusrec.scoring.metrics import transform_pixel_error
    from tusrec.train.cache import load_cache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--weights", type=Path, nargs="+", required=True)
    p.add_argument("--members", nargs="*", default=None, help="only these members")
    p.add_argument("--subjects", default="011")
    p.add_argument(
        "--steps",
        default="1,2",
        help="frame steps of the cache entries (default 1,2; 1,2,4 for members with 2 decorrelation steps)",
    )
    p.add_argument("--top", type=int, nargs="*", default=[2, 3, 4])
    p.add_argument(
        "--combo",
        action="append",
        default=[],
        metavar="LABEL=NAME,NAME,...",
        help="also score the mean of these members (repeatable; names as printed)",
    )
    p.add_argument("--fast", action="store_true", help="only the rho and the error correlation")
    p.add_argument(
        "--scales",
        type=float,
        nargs="*",
        default=[],
        help="also score the mean of all with its translations times each of these factors "
        "(a post-hoc output scale: is the members' shared error a scale?)",
    )
    p.add_argument(
        "--registration",
        action="store_true",
        help="also score the mean of all with its in-plane motion from registration",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    members = []
    for w in args.weights:
        for m in load_members(w):
            if args.members is None or m.name in args.members:
                m.name = f"{w.name}/{m.name}" if len(args.weights) > 1 else m.name
                members.append(m)
    size = tuple(members[0].cfg.input_size)
    subjects = [f"{int(s):03d}" for s in args.subjects.split(",")]
    raw = {s.key: s for s in open_data(args.data).scans if s.subject in subjects}
    keys = list(raw)
    # The frame steps of the training cache's entries (cache_steps of the configs), so the
    # trainers' cache is read, not rebuilt; the predictor's step-1 maps are among them.
    steps = tuple(int(k) for k in args.steps.split(","))
    channels = decorrelation_steps(members)
    if not set(range(1, channels + 1)) <= set(steps):
        p.error(f"--steps {args.steps} lacks frame steps 1..{channels}, which the members' input has")
    data = load_cache(args.data, size, keys, False, steps, args.cache)
    scans = data.scans
    ts = data.calib.T_scale
    ranked = ranked_by_validation(members)
    combos = {"mean-all": [m.name for m in members]}
    for k in args.top:
        if 1 < k < len(members):
            combos[f"mean-top{k}"] = [m.name for m in ranked[:k]]
    combos.update(parse_combos(args.combo, [m.name for m in members]))
    kinds = sorted({scan_kind(parse_scan_key(s.key)[1]) for s in scans})

    per: dict[str, dict] = {}
    true_d: dict[str, list] = {k: [] for k in kinds}
    pred_d: dict[str, dict[str, list]] = {}
    errors: dict[str, list] = {m.name: [] for m in members}
    errors_observable: dict[str, list] = {m.name: [] for m in members}
    frames: list[dict] = []  # the mean of all: per-transition disagreement and error
    own_frames: dict[str, list] = {m.name: [] for m in members}  # each member's expected and own error
    combo_frames: dict[str, list] = {}  # the same as frames, for each --combo and mean-topk

    def record(label: str, local: np.ndarray, scan, kind: str, observable_global: np.ndarray) -> None:
        row = per.setdefault(label, {"GPE": [], "LPE": [], "GPE_observable": []})
        global_ = compose_local(local)
        row["GPE"].append(transform_pixel_error(global_, scan.global_, ts, scan.image_size))
        row.setdefault(f"GPE_{kind}", []).append(row["GPE"][-1])
        row["GPE_observable"].append(transform_pixel_error(global_, observable_global, ts, scan.image_size))
        row["LPE"].append(transform_pixel_error(local, scan.local, ts, scan.image_size))
        pred_d.setdefault(label, {k: [] for k in kinds})[kind].append(dofs(local))

    def uncertainty_frame(locals_list: list[np.ndarray], combined, scan) -> dict:
        """A mean's per-transition disagreement, error and expected error, (N-1,) each."""
        return {
            "disagreement": member_disagreement(locals_list, combined.local, ts, scan.image_size),
            "error": frame_point_errors(combined.local, scan.local, ts, scan.image_size),
            "expected_error": combined.expected_error_mm,
        }

    for scan in scans:
        name = parse_scan_key(scan.key)[1]
        kind = scan_kind(name)
        inputs = scan.normalised(channels)
        outputs = {
            m.name: members_outputs([m], inputs, "cpu", None, False, scan_code(name))[0] for m in members
        }
        locals_ = {label: o.local for label, o in outputs.items()}
        true_d[kind].append(dofs(scan.local))
        # What a model whose only sign cue is the name can get right: (N-1, 4, 4).
        observable = in_plane(scan.local, keep_tz=name_signs_tz(ScanPattern.from_name(name)))
        combined = combine(
            list(locals_.values()), expected_errors=[o.expected_error_mm for o in outputs.values()]
        )
        mean_all = combined.local
        frames.append(uncertainty_frame(list(locals_.values()), combined, scan))
        for label, local in locals_.items():
            errors[label].append(frame_point_errors(local, scan.local, ts, scan.image_size))
            if outputs[label].expected_error_mm is not None:
                own_frames[label].append(
                    {"error": errors[label][-1], "expected_error": outputs[label].expected_error_mm}
                )
            errors_observable[label].append(frame_point_errors(local, observable, ts, scan.image_size))
        if args.fast:
            continue
        observable_global = compose_local(observable)
        for label, local in locals_.items():
            record(label, local, scan, kind, observable_global)
        for label, names in combos.items():
            if label == "mean-all":
                record(label, mean_all, scan, kind, observable_global)
                continue
            chosen = [locals_[n] for n in names]
            sub = combine(chosen, expected_errors=[outputs[n].expected_error_mm for n in names])
            record(label, sub.local, scan, kind, observable_global)
            combo_frames.setdefault(label, []).append(uncertainty_frame(chosen, sub, scan))
        for k in args.scales:
            scaled = mean_all.copy()
            scaled[:, :3, 3] *= k
            record(f"mean-all, translation x {k:g}", scaled, scan, kind, observable_global)
        if args.registration:
            square = square_frames((b for _, b in raw[scan.key].iter_frames()), data.calib)
            fitted, _ = register_in_plane(square, mean_all)
            record("mean-all + registration", with_in_plane(mean_all, fitted), scan, kind, observable_global)
            keep_tx = keeps_sweep_tx("registration-except-sweep", name)
            local = with_in_plane(mean_all, fitted, keep_tx)
            record("mean-all + registration except sweep", local, scan, kind, observable_global)
        record("identity", np.tile(np.eye(4), (len(scan.local), 1, 1)), scan, kind, observable_global)
        record("oracle: in-plane + named tz", observable, scan, kind, observable_global)

    result = {
        "subjects": args.subjects,
        "scans": len(scans),
        "models": {},
        "uncertainty_mean_all": uncertainty_rho(frames),
    }
    if all(f["expected_error"] is not None for f in frames):
        result["expected_error_mean_all"] = {
            **uncertainty_rho(frames, "expected_error"),
            "mean_expected_mm": float(np.concatenate([f["expected_error"] for f in frames]).mean()),
            "mean_error_mm": float(np.concatenate([f["error"] for f in frames]).mean()),
        }
        result["expected_error_members"] = {
            label: uncertainty_rho(own, "expected_error") for label, own in own_frames.items() if own
        }
    for label, fr in combo_frames.items():
        result.setdefault("uncertainty_combos", {})[label] = {"disagreement": uncertainty_rho(fr)}
        if all(f["expected_error"] is not None for f in fr):
            result["uncertainty_combos"][label]["expected_error"] = uncertainty_rho(fr, "expected_error")
    for label, row in per.items():
        entry = {k: float(np.mean(v)) for k, v in row.items()}
        for kind in kinds:
            t = np.concatenate(true_d[kind])
            pr = np.concatenate(pred_d[label][kind])
            entry[f"recovery_{kind}"] = dict(zip(DOFS, recovery(pr, t).round(3).tolist(), strict=True))
        result["models"][label] = entry
    names = [m.name for m in members]
    if len(names) > 1:
        for key, errs in (("error_correlation", errors), ("error_correlation_observable", errors_observable)):
            c = np.corrcoef(np.stack([np.concatenate(errs[n]) for n in names]))
            pairs = c[np.triu_indices(len(names), 1)]
            result[key] = {"min": float(pairs.min()), "max": float(pairs.max())}
    for label, entry in result["models"].items():
        rec = "  ".join(
            f"{kind}:" + ",".join(f"{entry[f'recovery_{kind}'][d]:+.2f}" for d in DOFS) for kind in kinds
        )
        print(
            f"{label:28s} GPE {entry['GPE']:7.2f}  LPE {entry['LPE']:.3f}  "
            f"GPE_observable {entry['GPE_observable']:7.2f}  "
            + " ".join(f"{kind} {entry[f'GPE_{kind}']:6.2f}" for kind in kinds)
            + f"  {rec}"
        )
    print("mean of all, disagreement vs error:", result["uncertainty_mean_all"])
    if "expected_error_mean_all" in result:
        print("mean of all, expected error vs error:", result["expected_error_mean_all"])
        for label, u in result["expected_error_members"].items():
            print(f"  {label}: its expected error vs its error: {u}")
    for label, u in result.get("uncertainty_combos", {}).items():
        print(f"{label}: rho with the error, {u}")
    if "error_correlation" in result:
        print("member error correlation:", result["error_correlation"])
        print("... against the observable motion:", result["error_correlation_observable"])
    print("recovery columns:", ",".join(DOFS))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
