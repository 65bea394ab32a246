"""Property-based fuzzing of the read side (issue 12 item 3): mutated prediction files
and manifests never make check or score raise, and a file that reaches outside itself
(links, virtual or external storage, a symlinked file) is never scored ok, nor is one
with chunks larger than the dataset they cover.

Deterministic (derandomize, no example database) and bounded: 40 examples of a
16 x 20, 5-frame scan, each checked and scored through the bounded worker."""

import contextlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tusrec.data import open_data, write_manifest
from tusrec.ddf import GroundTruth, write_ground_truth
from tusrec.scoring.score import check_predictions, score_predictions

SETTINGS = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SETS = ("GP", "LP", "GL", "LL", "transforms_global", "transforms_local")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One data folder (2 scans, 5 frames of 16 x 20), a victim team's kept predictions
    (the truth, which would score 0), and a valid dense and compact file of the
    fuzzed scan."""
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("fuzz")
    data = open_data(
        make_dataset(root / "data", "eval", ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 5, (16, 20))
    )
    scan, other = data.scans
    victim = root / "victim"
    for s in data.scans:
        write_ground_truth(s, data.calibration, victim / f"{s.key}.h5")
    base = root / "base"
    write_ground_truth(scan, data.calibration, base / "dense.h5")
    gt = GroundTruth.from_scan(scan, data.calibration)
    with h5py.File(base / "compact.h5", "w") as f:
        f.attrs["form"] = "transforms"
        f.attrs["runtime_seconds"] = 1.0
        f["transforms_global"] = gt.global_ @ np.diag([1.0, 1.0, 1.0, 1.0])
        f["transforms_local"] = gt.local
    return data, scan, other, victim, base, root


ATTRIBUTE_VALUES = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.floats(allow_nan=False, width=32), min_size=0, max_size=2000).map(np.array),
)

# A mutation: (kind, parameters). Linked kinds must never score ok.
LINKED = {"external link", "virtual", "soft link", "external storage", "symlinked file"}
MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(
        st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=8)
    ),
    st.tuples(st.just("attribute"), st.sampled_from(["runtime_seconds", "model", "form"]), ATTRIBUTE_VALUES),
    st.tuples(st.sampled_from(sorted(LINKED - {"symlinked file"})), st.sampled_from(SETS)),
    st.tuples(st.just("symlinked file")),
    st.tuples(
        st.just("chunks"),
        st.sampled_from(SETS),
        st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 400)),
    ),
    st.tuples(  # chunk shapes up to 10x the dataset's, filtered: the compression bombs' material
        st.just("compress"),
        st.sampled_from(SETS),
        st.sampled_from(["gzip", "lzf", "shuffle+gzip", "fletcher32+lzf"]),
        st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 3200)),
    ),
    st.tuples(
        st.just("dtype"),
        st.sampled_from(SETS),
        st.sampled_from(["float16", "int32", "uint8", "complex64", "bool", "S4", "float64"]),
    ),
    st.tuples(st.just("shape"), st.sampled_from(SETS), st.integers(-2, 2)),
    st.tuples(st.just("delete"), st.sampled_from(SETS)),
    st.tuples(
        st.just("manifest"),
        st.sampled_from(["status", "seconds", "frames", "message", "key"]),
        ATTRIBUTE_VALUES,
    ),
    st.tuples(st.just("manifest bytes"), st.binary(max_size=300)),
)


def _rebuild(f, name, **kwargs):
    data = f[name][()]
    del f[name]
    f.create_dataset(name, **({"data": data} | kwargs))


def mutate(path: Path, mutation, victim: Path, folder: Path) -> None:
    kind = mutation[0]
    if kind in ("truncate", "flip"):
        raw = bytearray(path.read_bytes())
        if kind == "truncate":
            raw = raw[: int(mutation[1] * len(raw))]
        else:
            for where, xor in mutation[1]:
                raw[min(int(where * len(raw)), len(raw) - 1)] ^= xor
        path.write_bytes(bytes(raw))
        return
    if kind == "symlinked file":
        path.unlink()
        path.symlink_to(victim)
        return
    if kind == "manifest":
        column, value = mutation[1], mutation[2]
        rows = [{"key": path.stem, "frames": 5, "status": "ok", "seconds": 1.0, "message": ""}]
        rows[0][column] = value.tolist() if isinstance(value, np.ndarray) else value
        write_manifest(folder, rows)
        return
    if kind == "manifest bytes":
        (folder / "predictions.csv").write_bytes(b"key,frames,status,seconds\n" + mutation[1])
        return
    with h5py.File(path, "r+") as f:
        if kind == "attribute":
            f.attrs[mutation[1]] = mutation[2]
            return
        name = mutation[1]
        if name not in f:
            return
        shape, dtype = f[name].shape, f[name].dtype
        if kind == "external link":
            del f[name]
            f[name] = h5py.ExternalLink(str(victim), name if name in ("GP", "LP", "GL", "LL") else "GP")
        elif kind == "virtual":
            with h5py.File(victim, "r") as v:
                vshape = v[name].shape if name in v else shape
            layout = h5py.VirtualLayout(vshape, dtype)
            layout[...] = h5py.VirtualSource(str(victim), name if vshape == shape else "GP", vshape)
            del f[name]
            f.create_virtual_dataset(name, layout)
        elif kind == "soft link":
            f.move(name, f"hidden_{name}")
            f[name] = h5py.SoftLink(f"/hidden_{name}")
        elif kind == "external storage":
            del f[name]
            f.create_dataset(
                name, shape, dtype, external=[(str(victim), 0, int(np.prod(shape)) * dtype.itemsize)]
            )
        elif kind == "chunks":
            chunks = tuple(min(c, s) for c, s in zip(mutation[2], shape, strict=False))
            _rebuild(f, name, chunks=chunks if all(chunks) else None)
        elif kind == "compress":
            flags = {"gzip": {"compression": "gzip"}, "lzf": {"compression": "lzf"}}
            flags["shuffle+gzip"] = {"compression": "gzip", "shuffle": True}
            flags["fletcher32+lzf"] = {"compression": "lzf", "fletcher32": True}
            chunks = mutation[3][: len(shape)] if shape else None
            _rebuild(f, name, chunks=chunks, maxshape=(None,) * len(shape), **flags[mutation[2]])
        elif kind == "dtype":
            data = f[name][()]
            del f[name]
            f.create_dataset(name, data=data.astype(mutation[2]))
        elif kind == "shape":
            data = f[name][()]
            new = tuple(max(1, s + mutation[2]) if i == len(shape) - 1 else s for i, s in enumerate(shape))
            del f[name]
            f.create_dataset(name, data=np.resize(data, new))
        elif kind == "delete":
            del f[name]


@SETTINGS
@given(form=st.sampled_from(["dense", "compact"]), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_files_and_manifests_never_raise_nor_score_a_link_ok(world, form, mutations):
    data, scan, other, victim_dir, base, root = world
    folder = root / "team"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    path = folder / f"{scan.key}.h5"
    shutil.copy(base / f"{form}.h5", path)
    shutil.copy(victim_dir / f"{other.key}.h5", folder / f"{other.key}.h5")
    write_manifest(folder, [{"key": s.key, "frames": 5, "status": "ok", "seconds": 1.0} for s in data.scans])
    victim = victim_dir / f"{scan.key}.h5"
    for mutation in mutations:
        if os.path.islink(path) and mutation[0] not in ("manifest", "manifest bytes"):
            break  # the file is now the victim's: never write through the link
        # h5py may refuse to build a mutation (or the file is already broken): fuzz it anyway.
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, RuntimeError):
            mutate(path, mutation, victim, folder)
    problems = check_predictions(folder, data)  # must not raise
    out = root / "scores"
    shutil.rmtree(out, ignore_errors=True)
    table = score_predictions(folder, data, out).set_index("key")  # must not raise
    assert set(table.index) == set(data.keys)
    row = table.loc[scan.key]
    assert isinstance(row["message"], str) or row["message"] != row["message"]
    linked = any(m[0] in LINKED for m in mutations)
    if linked and _reaches_outside(path):
        assert row["status"] != "ok", (mutations, row["message"])
        assert any(p.key == scan.key for p in problems)
    if row["status"] == "ok":
        assert np.isfinite(row[["GPE", "LPE"]].astype(float)).all()
        assert not _oversized_chunks(path), (mutations, row["message"])  # never decompressed


def _oversized_chunks(path: Path) -> bool:
    """Whether a dataset the format names has a chunk larger than itself along an axis
    (what the read policy refuses before decompressing anything)."""
    try:
        with h5py.File(path, "r") as f:
            sets = [f[name] for name in SETS if name in f and isinstance(f[name], h5py.Dataset)]
            return any(
                any(c > max(s, 1) for c, s in zip(ds.chunks, ds.shape, strict=True))
                for ds in sets
                if ds.chunks
            )
    except Exception:
        return False


def _reaches_outside(path: Path) -> bool:
    """Whether the mutated file (as built) still holds a link or foreign storage: a
    mutation h5py refused, or a later one that deleted the set, leaves nothing linked."""
    if os.path.islink(path):
        return True
    try:
        with h5py.File(path, "r") as f:
            for name in SETS:
                if not f.id.links.exists(name.encode()):
                    continue
                if f.id.links.get_info(name.encode()).type != h5py.h5l.TYPE_HARD:
                    return True
                dcpl = h5py.h5d.open(f.id, name.encode()).get_create_plist()
                if dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count():
                    return True
    except Exception:
        return False  # unreadable as HDF5: nothing in it can be followed
    return False
