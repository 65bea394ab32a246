"""The weights folder's manifest, read and checked without torch.

weights/manifest.json lists the ensemble's members: {"members": [{"name", "file",
"sha256", "config", "trained", "metrics"}]}. Reading it and verifying every file's
checksum needs only the standard library, so the commands that list or pick members
(`tusrec weights`, `--best`) start in a fraction of a second; tusrec.model.ensemble
builds the networks from the entries this returns.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
DEFAULT_WEIGHTS = Path(os.environ.get("TUSREC_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))


class WeightsError(ValueError):
    """weights/ is missing, incomplete or corrupt."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# A member has left the no-motion plateau when its validation GPE is at most this share
# of the identity's on the same subjects (metrics.val_identity_GPE, recorded by training).
PLATEAU_RATIO = 0.7


def validation_gpe(entry: dict) -> float:
    """A member's held-out GPE from its manifest entry (mm; inf when it has none)."""
    return float(entry.get("metrics", {}).get("val_GPE", float("inf")))


def validation_ratio(entry: dict) -> float | None:
    """A member's held-out GPE as a share of the identity's on the same scans (None when
    its entry lacks either)."""
    metrics = entry.get("metrics", {})
    gpe, identity = metrics.get("val_GPE"), metrics.get("val_identity_GPE")
    return float(gpe) / float(identity) if gpe is not None and identity else None


def validation_key(entries: list[dict]) -> Callable[[dict], float]:
    """How to rank these members by validation (lower is better): by validation_ratio when
    every entry records the identity's GPE, so that members validated on different subjects
    (bagging) compare fairly; else by the raw validation GPE."""
    if entries and all(validation_ratio(e) is not None for e in entries):
        return validation_ratio  # type: ignore[return-value]
    return validation_gpe


def checked_entries(weights_dir: str | Path, names: list[str] | None = None) -> list[dict]:
    """The manifest entries of every member of ``weights_dir`` (or only those ``names``),
    each file present and matching its sha256; raises WeightsError naming what is wrong."""
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
    return entries
