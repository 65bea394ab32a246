"""The registered ensemble's expected error per frame transition, from what the images say.

Why not the members' disagreement or their error heads: the members share their errors
(their frame-to-frame errors correlate 0.97-0.99), so how much they disagree says little of
how wrong they are (Spearman's rho 0.01-0.11 on the validation subjects), and their error
heads learnt the error of the networks' own in-plane motion, which registration replaces.
Once the in-plane motion is registered, what is left of the error is the out-of-plane
motion (which the members recover only in part) and what the registration missed. Both
show in the images: after frame i-1 is moved by the registered in-plane motion, how unlike
frame i it still is (tusrec.model.registration.pair_decorrelation).

The model, per kind of scan (KINDS: the 2024 parallel and perpendicular sweeps, the 2025
rotation scans; ``any``, fitted on all, for a name that says neither):

    log(error) = c0 + c1 log(decorrelation after) + c2 log(decorrelation before) + e,
    e ~ N(0, s^2)  =>  expected error = exp(c0 + c1 ... + s^2 / 2)  (mm)

with error the mean distance (mm) of the image points between the predicted and the true
T(i->i-1), the per-frame LPE. It is fitted by least squares (``fit``) on held-out subjects
with ground truth, by ``tusrec error-model`` (tusrec.train.error_model), and written beside the members
(weights/error_model.json), with the members it was fitted for: the predictor uses it only
for that ensemble, with registration. numpy only (the submission image has no scipy).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tusrec.model.manifest import WeightsError

ERROR_MODEL = "error_model.json"
KINDS = ("2024 Par", "2024 Per", "2025 rotation")
ANY_KIND = "any"
FEATURES = ("log decorrelation after registration", "log decorrelation before")
# Decorrelations are clipped to [FLOOR, 2] before the log: two identical frames give 0.
DECORRELATION_FLOOR = 1e-6


class ErrorModelError(WeightsError):
    """An error model file that cannot be used."""


def scan_kind(name: str | None) -> str:
    """The error model's kind of the scan ``name`` (KINDS), ANY_KIND when it says neither."""
    from tusrec.data import ScanPattern

    if name is None:
        return ANY_KIND
    pattern = ScanPattern.from_name(name)
    if pattern.protocol == "2025":
        return "2025 rotation"
    if pattern.protocol == "2024" and pattern.orientation in ("Par", "Per"):
        return f"2024 {pattern.orientation}"
    return ANY_KIND


def design(decorrelation: np.ndarray) -> np.ndarray:
    """(N, 2) decorrelation (before, after: pair_decorrelation's columns) -> the (N, 3)
    design matrix [1, log after, log before]."""
    d = np.clip(np.asarray(decorrelation, np.float64), DECORRELATION_FLOOR, 2.0)
    return np.stack([np.ones(len(d)), np.log(d[:, 1]), np.log(d[:, 0])], axis=1)


@dataclass
class ErrorModel:
    """Per kind: coefficients (c0, c1, c2) and the residual variance s^2 of log(error)."""

    coefficients: dict[str, list[float]]
    residual_variance: dict[str, float]
    transitions: dict[str, int]  # how many frame transitions each kind was fitted on
    members: list[dict] = field(default_factory=list)  # [{"name", "sha256"}] it was fitted for
    subjects: list[str] = field(default_factory=list)
    in_plane: str = ""  # the predictor's in-plane source it was fitted under
    features: tuple[str, ...] = FEATURES

    def expected_error_mm(self, decorrelation: np.ndarray, name: str | None) -> np.ndarray:
        """(N, 2) decorrelation (pair_decorrelation) of a scan called ``name`` -> (N,)
        expected error (mm) per transition: the mean of the fitted log-normal."""
        kind = scan_kind(name)
        if kind not in self.coefficients:
            kind = ANY_KIND
        c = np.asarray(self.coefficients[kind], np.float64)
        return np.exp(design(decorrelation) @ c + self.residual_variance[kind] / 2.0)

    def fits(self, members: list[dict]) -> bool:
        """Whether it was fitted for exactly these members (manifest entries: name, sha256)."""
        mine = sorted((m["name"], m["sha256"]) for m in self.members)
        return mine == sorted((m["name"], m["sha256"]) for m in members)

    def serves(self, members: list[dict], in_plane: str) -> bool:
        """Whether a predictor of these members with this in-plane source uses it: only when
        it registers, with the ensemble and the source the model was fitted for (its errors
        are theirs; a file without a source serves any registration)."""
        return in_plane != "network" and self.fits(members) and self.in_plane in ("", in_plane)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**asdict(self), "features": list(self.features)}, indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ErrorModel:
        """Read and check an error model file; ErrorModelError says what is wrong."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            model = cls(
                coefficients={str(k): [float(x) for x in v] for k, v in d["coefficients"].items()},
                residual_variance={str(k): float(v) for k, v in d["residual_variance"].items()},
                transitions={str(k): int(v) for k, v in d["transitions"].items()},
                members=[{"name": str(m["name"]), "sha256": str(m["sha256"])} for m in d.get("members", [])],
                subjects=[str(s) for s in d.get("subjects", [])],
                in_plane=str(d.get("in_plane", "")),
                features=tuple(d.get("features", FEATURES)),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ErrorModelError(f"{path}: not an error model ({type(err).__name__}: {err})") from None
        if model.features != FEATURES:
            raise ErrorModelError(
                f"{path}: features {list(model.features)}; this version computes {list(FEATURES)}"
            )
        if ANY_KIND not in model.coefficients:
            raise ErrorModelError(f"{path}: no coefficients for {ANY_KIND!r} (the fallback kind)")
        for kind, c in model.coefficients.items():
            s2 = model.residual_variance.get(kind)
            if len(c) != 3 or s2 is None or not np.all(np.isfinite([*c, s2])) or s2 < 0:
                raise ErrorModelError(
                    f"{path}: kind {kind!r}: expected 3 finite coefficients and a variance >= 0"
                )
        return model


def fit(samples: list[tuple[str | None, np.ndarray, np.ndarray]], min_transitions: int = 30) -> ErrorModel:
    """Least squares of log(error) on design(decorrelation), per kind and on all (ANY_KIND).

    samples: one per scan, (name, decorrelation (N-1, 2), error (N-1,) mm > 0). A kind with
    fewer than ``min_transitions`` transitions takes ANY_KIND's coefficients. The residual
    variance is the unbiased one (n - 3 degrees of freedom)."""
    minimum = max(min_transitions, 4)  # 3 coefficients and a residual variance
    total = sum(len(s[2]) for s in samples)
    if total < minimum:
        raise ValueError(f"{total} frame transitions: too few to fit an error model")
    groups: dict[str, list[int]] = {}
    for i, (name, _, _) in enumerate(samples):
        groups.setdefault(scan_kind(name), []).append(i)
    groups[ANY_KIND] = list(range(len(samples)))
    coefficients, variance, counts = {}, {}, {}
    for kind in [ANY_KIND] + [k for k in KINDS if k in groups]:
        X = np.concatenate([design(samples[i][1]) for i in groups[kind]])
        y = np.log(
            np.maximum(np.concatenate([np.asarray(samples[i][2], np.float64) for i in groups[kind]]), 1e-9)
        )
        if len(y) < minimum:  # never ANY_KIND, which holds them all
            continue
        c, *_ = np.linalg.lstsq(X, y, rcond=None)
        residual = y - X @ c
        coefficients[kind] = [float(x) for x in c]
        variance[kind] = float(residual @ residual / (len(y) - X.shape[1]))
        counts[kind] = len(y)
    return ErrorModel(coefficients, variance, counts)


def load_error_model(weights_dir: str | Path) -> ErrorModel | None:
    """The error model beside the members of ``weights_dir`` (ERROR_MODEL), None when it
    has none; ErrorModelError when the file is there but unusable."""
    path = Path(weights_dir) / ERROR_MODEL
    return ErrorModel.load(path) if path.exists() else None
