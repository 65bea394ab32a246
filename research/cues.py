"""What the inputs say about the motion, without any network: the cue a frame pair lacks.

    python -m research.cues DATA --cache DIR [--subjects 011] [--out F.json]

For every frame transition of the chosen subjects' scans (the training cache's inputs,
SYNTHETIC data), per scan kind and direction of the name (Par/Per sweeps, DtP/PtD;
rotation scans):

* the mean true motion T(i->i-1) per component (tx, ty, tz mm, rx, ry, rz rad): which
  component carries the sweep, and whether its sign is fixed by the name's direction;
* the share of transitions whose out-of-plane translation tz has the sign of the
  name's direction (1 or 0: the name tells the sign; 0.5: it does not);
* Spearman's rho of the decorrelation (1 - the mean NCC of the transition's map) with
  |tz| and with tz itself: the speckle says how far the plane moved, not which way.

The last two together are why a model that sees only frame pairs, trained on sweeps in
both directions, predicts no out-of-plane motion: the sign it would need is in the name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import spearmanr

    from tusrec.data import ScanPattern, open_data, parse_scan_key
    from tusrec.model.inputs import normalise_ncc
    from tusrec.train.cache import load_cache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--subjects", default="011")
    p.add_argument("--size", default="64x80")
    p.add_argument("--steps", default="1,2", help="frame steps of the cache entries (default 1,2)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    subjects = [f"{int(s):03d}" for s in args.subjects.split(",")]
    keys = [s.key for s in open_data(args.data).scans if s.subject in subjects]
    size = tuple(int(v) for v in args.size.split("x"))
    steps = tuple(int(k) for k in args.steps.split(","))
    data = load_cache(args.data, size, keys, False, steps, args.cache)

    from research.validation import dofs

    groups: dict[str, dict[str, list]] = {}
    for scan in data.scans:
        pattern = ScanPattern.from_name(parse_scan_key(scan.key)[1])
        if pattern.protocol == "2025":
            group, sign = "rotation", 0.0
        else:
            group = f"{pattern.orientation} {pattern.direction}"
            sign = 1.0 if pattern.direction == "DtP" else -1.0
        d = dofs(scan.local)  # (N-1, 6): transition k is frame k+1 -> k
        # Map of frame k+1 (its NCC with frame k), as the predictor gives it.
        ncc = normalise_ncc(np.asarray(scan.decorrelation[1][1:])).reshape(len(d), -1).mean(-1)
        g = groups.setdefault(group, {"d": [], "decor": [], "sign": []})
        g["d"].append(d)
        g["decor"].append(1.0 - ncc)
        g["sign"].append(np.full(len(d), sign))

    result = {"subjects": subjects, "groups": {}}
    for group, g in sorted(groups.items()):
        d, decor, sign = (np.concatenate(g[k]) for k in ("d", "decor", "sign"))
        tz = d[:, 2]
        entry = {
            "transitions": len(d),
            "mean": dict(zip(("tx", "ty", "tz", "rx", "ry", "rz"), d.mean(0).round(4).tolist(), strict=True)),
            "mean_abs": dict(
                zip(("tx", "ty", "tz", "rx", "ry", "rz"), np.abs(d).mean(0).round(4).tolist(), strict=True)
            ),
            "rho_decorrelation_abs_tz": float(spearmanr(decor, np.abs(tz)).statistic),
            "rho_decorrelation_tz": float(spearmanr(decor, tz).statistic),
        }
        if group != "rotation":
            entry["tz_sign_is_direction"] = float(np.mean(np.sign(tz) == sign))
        result["groups"][group] = entry
        print(group, json.dumps(entry))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
