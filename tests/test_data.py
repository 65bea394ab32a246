"""The data layer: layouts, names, round trips and bad input (docs/conventions.md section 1).

Bad input must raise TusrecDataError (CalibrationError from geometry.read_calibration)
naming the file, the dataset where there is one, and what was expected, and must leave
nothing behind: readers change no file, failed writers leave no file and no temporary.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest

from tusrec.data import (
    EVAL,
    TRAIN,
    ScanPattern,
    TusrecDataError,
    open_data,
    parse_scan_key,
    scan_key,
    write_data_calibration,
    write_dataset_keys,
    write_landmarks,
    write_scan,
)
from tusrec.geometry import (
    Calibration,
    CalibrationError,
    default_calibration,
    pose6_to_matrix,
    read_calibration,
)

H, W = 24, 32
N = 6

NAMES_2024 = [
    f"{arm}_{orientation}_{shape}_{direction}"
    for arm, orientation, shape, direction in itertools.product(
        ("LH", "RH"), ("Par", "Per"), ("L", "C", "S"), ("DtP", "PtD")
    )
]
NAMES_2025 = ["LH_rotation", "RH_rotation"]
EDITION_NAMES = {"2024": ("LH_Par_C_DtP", "RH_Per_S_PtD"), "2025": tuple(NAMES_2025)}

# docs/conventions.md 1.4, as printed there.
SCALE_LABEL = "scaling_from_pixel_to_mm"
ROTATION_LABEL = "spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system"
TUSREC_T_SCALE_DIAG = ("0.229389190673828", "0.220979690551758", "1", "1")
TUSREC_T_ROTATION = (
    ("0.231064671309448", "-0.21805203504134", "0.948189025293473", "-70.7413291931152"),
    ("-0.190847036221471", "-0.965787272832032", "-0.175591436013112", "-80.6505661010742"),
    ("0.954036962825936", "-0.140386087807861", "-0.264773903381482", "-46.1766223907471"),
    ("0", "0", "0", "1"),
)


# --------------------------------------------------------------------------- helpers


def tforms_for(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    poses = np.concatenate([rng.normal(0.0, 0.5, (n, 3)), rng.normal(0.0, 60.0, (n, 3))], axis=1)
    return pose6_to_matrix(poses)


def frames_for(n: int, seed: int = 0, image_size: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *image_size), dtype=np.uint8)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def files_under(root: Path) -> list[str]:
    return sorted(snapshot(root)) if Path(root).exists() else []


def write_h5(path: Path, **datasets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)


def scan_paths(root: Path, layout: str, subject: str, name: str) -> tuple[Path, Path]:
    """(frames file, tforms file) of a scan in a layout."""
    if layout == TRAIN:
        p = root / "frames_transfs" / subject / f"{name}.h5"
        return p, p
    return root / "frames" / subject / f"{name}.h5", root / "transfs" / subject / f"{name}.h5"


def write_raw_scan(root: Path, layout: str, frames=None, tforms=None, subject="000", name="LH_rotation"):
    """Write a scan with h5py directly (no validation); None leaves a dataset out."""
    fp, tp = scan_paths(root, layout, subject, name)
    if layout == TRAIN:
        datasets = {k: v for k, v in (("frames", frames), ("tforms", tforms)) if v is not None}
        write_h5(fp, **datasets)
    else:
        write_h5(fp, **({} if frames is None else {"frames": frames}))
        if tforms is not None:
            write_h5(tp, tforms=tforms)
    return fp, tp


def expect_error(fn, *parts, error=TusrecDataError) -> str:
    """fn() raises ``error`` whose message contains every one of ``parts``."""
    with pytest.raises(error) as info:
        fn()
    msg = str(info.value)
    for part in parts:
        assert str(part) in msg, f"{str(part)!r} not in message {msg!r}"
    return msg


def expect_read_error(root: Path, fn, *parts, error=TusrecDataError) -> str:
    """Like expect_error, and no file under root changed."""
    before = snapshot(root)
    msg = expect_error(fn, *parts, error=error)
    assert snapshot(root) == before
    return msg


def calib_text(calib: Calibration) -> list[str]:
    """The 10 lines of calib_matrix.csv (docs/conventions.md 1.4), without validating."""
    rows = [",".join(repr(float(v)) for v in r) for r in (*calib.T_scale, *calib.T_rotation)]
    return [SCALE_LABEL, *rows[:4], ROTATION_LABEL, *rows[4:]]


# --------------------------------------------------------------------------- names


def test_there_are_24_names_of_2024():
    assert len(set(NAMES_2024)) == 24


@pytest.mark.parametrize("name", NAMES_2024)
def test_scan_pattern_2024(name):
    arm, orientation, shape, direction = name.split("_")
    pattern = ScanPattern.from_name(name)
    assert pattern == ScanPattern("2024", arm, orientation, shape, direction)
    assert pattern.as_dict() == {
        "protocol": "2024",
        "arm": arm,
        "orientation": orientation,
        "shape": shape,
        "direction": direction,
    }


@pytest.mark.parametrize("name", NAMES_2025)
def test_scan_pattern_2025(name):
    pattern = ScanPattern.from_name(name)
    assert pattern.as_dict() == {
        "protocol": "2025",
        "arm": name[:2],
        "orientation": None,
        "shape": None,
        "direction": None,
    }


@pytest.mark.parametrize(
    "name",
    [
        "",
        "LH_Par_C",
        "LH_Par_C_DtP_2",
        "lh_par_c_dtp",
        "XH_Par_C_DtP",
        "RH_Ver_L_DtP",  # the organisers' README typo for 'Per'
        "LH_Par_X_DtP",
        "LH_Par_C_PtP",
        "RH_rotation_2",
        "LH_Rotation",
        "sub050__LH_Par_C_DtP",
        "LH_Par_C_DtP\n",
        "LH_rotation\n",
    ],
)
def test_scan_pattern_unknown(name):
    assert ScanPattern.from_name(name) == ScanPattern("unknown")
    assert ScanPattern.from_name(name).as_dict() == {
        "protocol": "unknown",
        "arm": None,
        "orientation": None,
        "shape": None,
        "direction": None,
    }


@pytest.mark.parametrize(
    ("key", "subject", "name"),
    [
        ("sub050__LH_Par_C_DtP", "050", "LH_Par_C_DtP"),
        ("sub000__RH_rotation", "000", "RH_rotation"),
        ("sub123__RH_Per_S_PtD", "123", "RH_Per_S_PtD"),
        ("sub052__a__b", "052", "a__b"),
    ],
)
def test_parse_scan_key(key, subject, name):
    assert parse_scan_key(key) == (subject, name)
    assert scan_key(subject, name) == key
    assert scan_key(int(subject), name) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "LH_Par_C_DtP",
        "sub50__LH_Par_C_DtP",
        "sub0500__LH_Par_C_DtP",
        "sub050_LH_Par_C_DtP",
        "sub050__",
        "050__LH_Par_C_DtP",
        "SUB050__LH_Par_C_DtP",
        "subabc__LH_Par_C_DtP",
        "sub050__LH_rotation\n",
    ],
)
def test_parse_scan_key_malformed(key):
    expect_error(lambda: parse_scan_key(key), repr(key), "sub<3 digits>__<scan name>")


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("spelling", ["landmark", "landmarks"])
@pytest.mark.parametrize("edition", ["2024", "2025"])
def test_open_eval_layout(tmp_path, dataset_factory, spelling, edition):
    names = EDITION_NAMES[edition]
    root = dataset_factory(tmp_path / "d", EVAL, ("051", "050"), names, N, (H, W), spelling)
    data = open_data(root)
    assert data.layout == EVAL
    assert data.root == root
    assert data.keys == sorted(f"sub{s}__{n}" for s in ("050", "051") for n in names)
    assert data.landmark_path("050") == root / spelling / "landmark_050.h5"
    assert data.calibration_path == root / "calib_matrix.csv"
    ref = default_calibration()
    assert np.array_equal(data.calibration.T_scale, ref.T_scale)
    assert np.array_equal(data.calibration.T_rotation, ref.T_rotation)
    for scan in data.scans:
        subject, name = parse_scan_key(scan.key)
        assert (scan.subject, scan.name) == (subject, name)
        assert scan.pattern.protocol == edition
        assert scan.frames_path == root / "frames" / subject / f"{name}.h5"
        assert scan.tforms_path == root / "transfs" / subject / f"{name}.h5"
        assert scan.landmark_path == root / spelling / f"landmark_{subject}.h5"
        assert scan.has_tforms
        assert scan.has_landmarks
        assert scan.shape == (N, H, W)
        assert scan.n_frames == N
        assert scan.image_size == (H, W)
        frames = scan.read_frames()
        assert frames.dtype == np.uint8
        assert frames.shape == (N, H, W)
        tforms = scan.read_tforms()
        assert tforms.shape == (N, 4, 4)
        assert tforms.dtype == np.float64
        with h5py.File(scan.landmark_path, "r") as f:
            raw = f[name][()]
        assert np.array_equal(scan.read_landmarks(), raw)
        assert data.scan(scan.key) is scan


@pytest.mark.parametrize("edition", ["2024", "2025"])
def test_open_train_layout(tmp_path, dataset_factory, edition):
    names = EDITION_NAMES[edition]
    root = dataset_factory(tmp_path / "d", TRAIN, ("001", "000"), names, N, (H, W), "landmarks")
    data = open_data(root)
    assert data.layout == TRAIN
    assert data.keys == sorted(f"sub{s}__{n}" for s in ("000", "001") for n in names)
    for scan in data.scans:
        subject, name = parse_scan_key(scan.key)
        assert (scan.subject, scan.name) == (subject, name)
        assert scan.pattern == ScanPattern.from_name(name)
        assert scan.pattern.protocol == edition
        assert scan.frames_path == root / "frames_transfs" / subject / f"{name}.h5"
        assert scan.tforms_path == scan.frames_path
        assert scan.landmark_path == root / "landmarks" / f"landmark_{subject}.h5"
        assert scan.has_tforms
        assert scan.has_landmarks
        assert scan.shape == (N, H, W)
        assert scan.read_tforms().shape == (N, 4, 4)
        assert scan.read_landmarks().shape == (5, 3)


def test_train_layout_ignores_the_eval_folders(train_root):
    """frames_transfs/ decides the layout; a stray frames/ or landmark/ does not change it."""
    (train_root / "frames" / "000").mkdir(parents=True)
    (train_root / "landmark").mkdir()
    data = open_data(train_root)
    assert data.layout == TRAIN
    assert data.keys == [scan_key(s, n) for s in ("000", "001") for n in NAMES_2025]
    assert data.landmark_path("001") == train_root / "landmarks" / "landmark_001.h5"
    assert all(s.read_landmarks().shape == (5, 3) for s in data.scans)


def test_scan_knows_its_pattern(eval_root):
    scan = open_data(eval_root).scan("sub050__LH_Par_C_DtP")
    assert scan.key == "sub050__LH_Par_C_DtP"
    assert scan.subject == "050"
    assert scan.name == "LH_Par_C_DtP"
    assert scan.pattern == ScanPattern("2024", "LH", "Par", "C", "DtP")
    scan = open_data(eval_root).scan("sub051__RH_Per_L_PtD")
    assert scan.pattern == ScanPattern("2024", "RH", "Per", "L", "PtD")


def test_unknown_key_lookup(eval_root):
    expect_error(lambda: open_data(eval_root).scan("sub050__LH_rotation"), eval_root, "'sub050__LH_rotation'")


# File order (glob, per folder) differs from key order for these names: 'LH_rotation-2.h5'
# sorts before 'LH_rotation.h5' but 'sub000__LH_rotation' sorts before 'sub000__LH_rotation-2'.
UNSORTED_NAMES = ("RH_rotation", "LH_rotation-2", "LH_rotation")


@pytest.mark.parametrize(("layout", "with_keys"), [(TRAIN, False), (EVAL, False), (EVAL, True)])
def test_scans_sorted_by_key(tmp_path, dataset_factory, layout, with_keys):
    root = dataset_factory(
        tmp_path / "d", layout, ("002", "000", "001"), UNSORTED_NAMES, 3, (H, W), with_keys=with_keys
    )
    keys = open_data(root).keys
    assert keys == sorted(keys)
    assert set(keys) == {scan_key(s, n) for s in (0, 1, 2) for n in UNSORTED_NAMES}


def test_eval_layout_without_keys_file_takes_scans_from_frames(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), with_keys=False)
    (root / "frames" / "not_a_subject").mkdir()
    write_h5(root / "frames" / "not_a_subject" / "x.h5", frames=frames_for(N))
    assert open_data(root).keys == ["sub050__LH_rotation", "sub050__RH_rotation"]


def test_eval_layout_keys_file_selects_scans(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), with_keys=False)
    write_dataset_keys(root, ["sub050__RH_rotation"])
    assert open_data(root).keys == ["sub050__RH_rotation"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("start", [0, 2])
def test_iter_frames_chunks_add_up(tmp_path, chunk, start):
    frames = frames_for(7)
    scan = write_scan(tmp_path, TRAIN, 0, "LH_rotation", frames, tforms_for(7))
    pieces = list(scan.iter_frames(chunk=chunk, start=start))
    assert [s for s, _ in pieces] == list(range(start, 7, chunk))
    assert all(len(p) == min(chunk, 7 - s) for s, p in pieces)
    assert np.array_equal(np.concatenate([p for _, p in pieces]), frames[start:])
    assert all(p.dtype == np.uint8 for _, p in pieces)


@pytest.mark.parametrize(("start", "stop"), [(0, None), (2, 5), (4, None), (0, 1), (6, 7), (3, 3)])
def test_read_frames_slices(tmp_path, start, stop):
    frames = frames_for(7)
    scan = write_scan(tmp_path, EVAL, 0, "LH_rotation", frames, tforms_for(7))
    got = scan.read_frames(start, stop)
    assert got.dtype == np.uint8
    assert np.array_equal(got, frames[start:stop])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
def test_write_scan_round_trip(tmp_path, layout):
    frames, tforms = frames_for(N, 1), tforms_for(N, 2)
    written = write_scan(tmp_path, layout, 50, "LH_Par_C_DtP", frames, tforms)
    fp, tp = scan_paths(tmp_path, layout, "050", "LH_Par_C_DtP")
    assert (written.frames_path, written.tforms_path) == (fp, tp)
    assert written.key == "sub050__LH_Par_C_DtP"
    if layout == TRAIN:
        with h5py.File(fp, "r") as f:
            assert sorted(f.keys()) == ["frames", "tforms"]
            assert f["tforms"].dtype == np.float32
    else:
        with h5py.File(fp, "r") as f:
            assert sorted(f.keys()) == ["frames"]
        with h5py.File(tp, "r") as f:
            assert sorted(f.keys()) == ["tforms"]
            assert f["tforms"].dtype == np.float32
    scan = open_data(tmp_path).scan("sub050__LH_Par_C_DtP")
    back = scan.read_frames()
    assert back.dtype == np.uint8
    assert np.array_equal(back, frames)
    assert np.array_equal(scan.read_tforms(), tforms.astype(np.float32).astype(np.float64))
    assert files_under(tmp_path) == sorted({str(fp.relative_to(tmp_path)), str(tp.relative_to(tmp_path))})


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
def test_write_scan_from_chunks(tmp_path, layout):
    frames, tforms = frames_for(7, 3), tforms_for(7, 4)
    scan = write_scan(tmp_path, layout, 1, "RH_rotation", (frames[i : i + 3] for i in range(0, 7, 3)), tforms)
    assert np.array_equal(scan.read_frames(), frames)
    assert np.array_equal(scan.read_tforms(), tforms.astype(np.float32).astype(np.float64))


def test_landmarks_round_trip(tmp_path):
    scan = write_scan(tmp_path, TRAIN, 3, "LH_rotation", frames_for(N), tforms_for(N))
    lm = np.array([[1, 1, 1], [N - 1, W, H], [3, 17, 9]], dtype=np.int32)
    write_landmarks(tmp_path / "landmarks" / "landmark_003.h5", {"LH_rotation": lm})
    scan = open_data(tmp_path).scan(scan.key)
    back = scan.read_landmarks()
    assert back.dtype == np.int64
    assert np.array_equal(back, lm)
    with h5py.File(scan.landmark_path, "r") as f:
        assert list(f.keys()) == ["LH_rotation"]
        assert np.issubdtype(f["LH_rotation"].dtype, np.integer)


def test_write_landmarks_keeps_other_scans(tmp_path):
    path = tmp_path / "landmarks" / "landmark_000.h5"
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[2, 3, 4]])
    c = np.array([[5, 6, 7], [1, 1, 1]])
    write_landmarks(path, {"LH_rotation": a})
    write_landmarks(path, {"RH_rotation": b})
    write_landmarks(path, {"LH_Par_C_DtP": c})
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["LH_Par_C_DtP", "LH_rotation", "RH_rotation"]
        assert np.array_equal(f["LH_rotation"][()], a)
        assert np.array_equal(f["RH_rotation"][()], b)
        assert np.array_equal(f["LH_Par_C_DtP"][()], c)
    write_landmarks(path, {"RH_rotation": c})  # replacing one scan keeps the others
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["LH_Par_C_DtP", "LH_rotation", "RH_rotation"]
        assert np.array_equal(f["RH_rotation"][()], c)
        assert np.array_equal(f["LH_rotation"][()], a)
    assert files_under(path.parent) == ["landmark_000.h5"]


def test_dataset_keys_round_trip(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050", "051"), NAMES_2025, N, (H, W), with_keys=False)
    keys = ["sub051__RH_rotation", "sub050__LH_rotation", "sub050__LH_rotation"]
    write_dataset_keys(root, keys)
    with h5py.File(root / "dataset_keys.h5", "r") as f:
        assert sorted(f.keys()) == ["sub050__LH_rotation", "sub051__RH_rotation"]
    assert open_data(root).keys == ["sub050__LH_rotation", "sub051__RH_rotation"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_round_trip_exact(tmp_path, seed):
    rng = np.random.default_rng(seed)
    T_rotation = pose6_to_matrix(np.concatenate([rng.normal(0, 1, 3), rng.normal(0, 80, 3)]))
    T_scale = np.diag([rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5), 1.0, 1.0])
    write_data_calibration(tmp_path, Calibration(T_scale, T_rotation))
    path = tmp_path / "calib_matrix.csv"
    back = read_calibration(path)
    assert np.array_equal(back.T_scale, T_scale)
    assert np.array_equal(back.T_rotation, T_rotation)
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) == 10
    assert text.count("\n") <= 10
    assert lines[0] == SCALE_LABEL
    assert lines[5] == ROTATION_LABEL
    for rows, matrix in ((lines[1:5], T_scale), (lines[6:10], T_rotation)):
        for line, expected in zip(rows, matrix, strict=True):
            values = line.split(",")
            assert len(values) == 4
            assert [float(v) for v in values] == expected.tolist()
    assert files_under(tmp_path) == ["calib_matrix.csv"]


def test_default_calibration_matches_tusrec_digits(tmp_path):
    calib = default_calibration()
    assert calib.T_scale.dtype == np.float64
    assert calib.T_rotation.dtype == np.float64
    assert np.array_equal(calib.T_scale, np.diag([float(v) for v in TUSREC_T_SCALE_DIAG]))
    assert calib.T_rotation.tolist() == [[float(v) for v in row] for row in TUSREC_T_ROTATION]
    assert calib.pixel_spacing_mm == (0.229389190673828, 0.220979690551758)
    # and it survives the file
    write_data_calibration(tmp_path, calib)
    back = read_calibration(tmp_path / "calib_matrix.csv")
    assert back.T_rotation.tolist() == [[float(v) for v in row] for row in TUSREC_T_ROTATION]
    assert np.array_equal(back.T_scale, calib.T_scale)


def test_calibration_reads_organiser_style_file(tmp_path):
    """The numbers of docs/conventions.md 1.4, printed as there, read back to those numbers."""
    scale_rows = [",".join(d if j == i else "0" for j in range(4)) for i, d in enumerate(TUSREC_T_SCALE_DIAG)]
    rotation_rows = [",".join(r) for r in TUSREC_T_ROTATION]
    (tmp_path / "calib_matrix.csv").write_text(
        "\n".join([SCALE_LABEL, *scale_rows, ROTATION_LABEL, *rotation_rows]) + "\n"
    )
    calib = read_calibration(tmp_path / "calib_matrix.csv")
    ref = default_calibration()
    assert np.array_equal(calib.T_scale, ref.T_scale)
    assert np.array_equal(calib.T_rotation, ref.T_rotation)


# --------------------------------------------------------------------------- bad calibration


def _calib_missing(lines):
    return None


def _calib_nine_lines(lines):
    return lines[:-1]


def _calib_eleven_lines(lines):
    return [*lines, "0,0,0,1"]


def _calib_non_numeric(lines):
    return [*lines[:2], "0,abc,0,0", *lines[3:]]


def _calib_three_values(lines):
    row = lines[7].split(",")
    return [*lines[:7], ",".join(row[:3]), *lines[8:]]


def _bad_calibration(case: str) -> Calibration:
    """The default calibration with one matrix made invalid."""
    ts, tr = default_calibration().T_scale.copy(), default_calibration().T_rotation.copy()
    if case == "rotation scaled":
        tr[:3, :3] *= 1.1
    elif case == "rotation reflected":
        tr[:3, 0] *= -1  # still orthonormal, but det -1
    elif case == "scale not diagonal":
        ts[0, 1] = 0.01
    else:
        raise AssertionError(case)
    return Calibration(ts, tr)


def _calib_rotation_scaled(lines):
    return calib_text(_bad_calibration("rotation scaled"))


def _calib_rotation_reflected(lines):
    return calib_text(_bad_calibration("rotation reflected"))


def _calib_scale_not_diagonal(lines):
    return calib_text(_bad_calibration("scale not diagonal"))


BAD_CALIBRATIONS = {
    "missing": (_calib_missing, ["not found", "calib_matrix.csv"]),
    "nine lines": (_calib_nine_lines, ["expected 10", "got 9"]),
    "eleven lines": (_calib_eleven_lines, ["expected 10", "got 11"]),
    "non-numeric": (_calib_non_numeric, ["line 3", "4 comma-separated numbers", "abc"]),
    "row of 3": (_calib_three_values, ["line 8", "3 values, expected 4"]),
    "rotation scaled": (_calib_rotation_scaled, ["T_rotation must be rigid"]),
    "rotation reflected": (_calib_rotation_reflected, ["T_rotation must be rigid", "det +1"]),
    "scale not diagonal": (_calib_scale_not_diagonal, ["T_scale must be diag(sx, sy, 1, 1)"]),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATIONS))
def test_bad_calibration(tmp_path, dataset_factory, case):
    mutate, parts = BAD_CALIBRATIONS[case]
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), ("LH_rotation",), N, (H, W))
    path = root / "calib_matrix.csv"
    lines = mutate(path.read_text().splitlines())
    if lines is None:
        path.unlink()
    else:
        path.write_text("\n".join(lines) + "\n")
    expect_read_error(root, lambda: read_calibration(path), path, *parts, error=CalibrationError)
    data = open_data(root)
    expect_read_error(root, lambda: data.calibration, path, *parts)


@pytest.mark.parametrize("case", ["rotation scaled", "rotation reflected", "scale not diagonal"])
def test_write_bad_calibration_writes_nothing(tmp_path, case):
    bad = _bad_calibration(case)
    with pytest.raises(CalibrationError):
        write_data_calibration(tmp_path, bad)
    assert files_under(tmp_path) == []
    write_data_calibration(tmp_path, default_calibration())
    before = snapshot(tmp_path)
    with pytest.raises(CalibrationError):
        write_data_calibration(tmp_path, bad)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- bad frames


BAD_FRAMES = {
    "float32": (frames_for(N).astype(np.float32), ["uint8", "(N, H, W)", "float32"]),
    "uint16": (frames_for(N).astype(np.uint16), ["uint8", "(N, H, W)", "uint16"]),
    "2-D": (frames_for(1)[0], ["uint8", "(N, H, W)", f"({H}, {W})"]),
    "4-D": (frames_for(N)[..., None], ["uint8", "(N, H, W)", f"({N}, {H}, {W}, 1)"]),
    "one frame": (frames_for(1), ["1 frame(s)", "at least 2"]),
}


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
@pytest.mark.parametrize("case", list(BAD_FRAMES))
@pytest.mark.parametrize("access", ["shape", "read_frames", "iter_frames"])
def test_bad_frames(tmp_path, layout, case, access):
    frames, parts = BAD_FRAMES[case]
    fp, _ = write_raw_scan(tmp_path, layout, frames, tforms_for(len(frames)))
    scan = open_data(tmp_path).scans[0]
    fn = {
        "shape": lambda: scan.shape,
        "read_frames": scan.read_frames,
        "iter_frames": lambda: list(scan.iter_frames()),
    }[access]
    expect_read_error(tmp_path, fn, fp, "'frames'", *parts)


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
def test_frames_dataset_missing(tmp_path, layout):
    fp, _ = write_raw_scan(tmp_path, layout, None, tforms_for(N))
    if layout == EVAL:
        write_h5(fp, images=frames_for(N))  # a file, but with the wrong dataset
    scan = open_data(tmp_path).scans[0]
    expect_read_error(tmp_path, scan.read_frames, fp, "no dataset 'frames'", "uint8 (N, H, W)")
    expect_read_error(tmp_path, lambda: scan.n_frames, fp, "no dataset 'frames'")


# --------------------------------------------------------------------------- bad tforms


def _nan_tforms():
    t = tforms_for(N)
    t[2, 0, 3] = np.nan
    return t


def _inf_tforms():
    t = tforms_for(N)
    t[4, 1, 1] = -np.inf
    return t


def _one_zero_tform():
    t = tforms_for(N)
    t[3] = 0
    return t


BAD_TFORMS = {
    "(N,3,4)": (tforms_for(N)[:, :3, :], ["(N, 4, 4)", f"({N}, 3, 4)"]),
    "(N,16)": (tforms_for(N).reshape(N, 16), ["(N, 4, 4)", f"({N}, 16)"]),
    "(4,4)": (tforms_for(1)[0], ["(N, 4, 4)", "(4, 4)"]),
    "N+1": (tforms_for(N + 1), [f"{N + 1} transforms", f"{N} frames", "one (4, 4) transform per frame"]),
    "N-1": (tforms_for(N - 1), [f"{N - 1} transforms", f"{N} frames", "one (4, 4) transform per frame"]),
    "NaN": (_nan_tforms(), ["non-finite", "[2]"]),
    "Inf": (_inf_tforms(), ["non-finite", "[4]"]),
    "all zeros": (np.zeros((N, 4, 4)), ["singular", "[0, 1, 2, 3, 4, 5]", "rigid"]),
    "one zero": (_one_zero_tform(), ["singular", "[3]"]),
}


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
@pytest.mark.parametrize("case", list(BAD_TFORMS))
def test_bad_tforms(tmp_path, layout, case):
    tforms, parts = BAD_TFORMS[case]
    _, tp = write_raw_scan(tmp_path, layout, frames_for(N), tforms)
    scan = open_data(tmp_path).scans[0]
    assert scan.has_tforms
    expect_read_error(tmp_path, scan.read_tforms, tp, "'tforms'", *parts)


def test_tforms_dataset_missing(tmp_path):
    _, tp = write_raw_scan(tmp_path, EVAL, frames_for(N), None)
    write_h5(tp, transforms=tforms_for(N))
    scan = open_data(tmp_path).scans[0]
    expect_read_error(tmp_path, scan.read_tforms, tp, "no dataset 'tforms'", "(N, 4, 4)")


# --------------------------------------------------------------------------- bad landmarks


BAD_LANDMARKS = {
    "frame 0": ([[0, 5, 5]], [f"frame index 0, outside 1..{N - 1}"]),
    "frame N": ([[2, 5, 5], [N, 5, 5]], [f"landmark 1 has frame index {N}, outside 1..{N - 1}"]),
    "x 0": ([[1, 0, 5]], [f"x 0, outside 1..{W}"]),
    "x W+1": ([[1, W + 1, 5]], [f"x {W + 1}, outside 1..{W}"]),
    "y 0": ([[1, 5, 0]], [f"y 0, outside 1..{H}"]),
    "y H+1": ([[1, 5, H + 1]], [f"y {H + 1}, outside 1..{H}"]),
    "(K,2)": ([[1, 5], [2, 6]], ["(K, 3)", "(2, 2)"]),
    "(K,4)": ([[1, 5, 5, 5]], ["(K, 3)", "(1, 4)"]),
    "(3,)": ([1, 5, 5], ["(K, 3)", "(3,)"]),
    "(0,3)": (np.zeros((0, 3), np.int64), ["(K, 3)", "(0, 3)"]),
    "non-integer": ([[1.5, 5.0, 5.0]], ["integers"]),
}


@pytest.mark.parametrize("case", list(BAD_LANDMARKS))
def test_bad_landmarks(tmp_path, dataset_factory, case):
    table, parts = BAD_LANDMARKS[case]
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), "landmark")
    path = root / "landmark" / "landmark_050.h5"
    with h5py.File(path, "a") as f:
        del f["LH_rotation"]
        f.create_dataset("LH_rotation", data=np.asarray(table))
    data = open_data(root)
    expect_read_error(
        root, data.scan("sub050__LH_rotation").read_landmarks, path, "dataset 'LH_rotation'", *parts
    )
    assert data.scan("sub050__RH_rotation").read_landmarks().shape == (5, 3)  # the other is fine


def test_landmark_dataset_missing(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), "landmark")
    path = root / "landmark" / "landmark_050.h5"
    with h5py.File(path, "a") as f:
        del f["RH_rotation"]
    scan = open_data(root).scan("sub050__RH_rotation")
    assert not scan.has_landmarks
    expect_read_error(root, scan.read_landmarks, path, "no dataset 'RH_rotation'", "(K, 3)", "LH_rotation")


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
def test_landmark_file_missing(tmp_path, dataset_factory, layout):
    root = dataset_factory(tmp_path / "d", layout, ("050", "051"), NAMES_2025, N, (H, W), "landmarks")
    path = root / "landmarks" / "landmark_051.h5"
    path.unlink()
    scan = open_data(root).scan("sub051__LH_rotation")
    assert not scan.has_landmarks
    expect_read_error(
        root,
        scan.read_landmarks,
        "sub051__LH_rotation",
        path,
        "not found",
        "'LH_rotation'",
        "landmark_051.h5",
    )


# --------------------------------------------------------------------------- keys, folders, non-HDF5


def test_key_without_frames_file(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), with_keys=False)
    write_dataset_keys(root, ["sub050__LH_rotation", "sub050__RH_rotation", "sub051__LH_Par_C_DtP"])
    expect_read_error(
        root,
        lambda: open_data(root),
        root / "dataset_keys.h5",
        "'sub051__LH_Par_C_DtP'",
        root / "frames" / "051" / "LH_Par_C_DtP.h5",
    )


def test_malformed_key_in_keys_file(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), with_keys=False)
    write_h5(root / "dataset_keys.h5", sub050__LH_rotation=np.int8(0), LH_rotation=np.int8(0))
    expect_read_error(
        root, lambda: open_data(root), root / "dataset_keys.h5", "'LH_rotation'", "sub<3 digits>__<scan name>"
    )


NOT_HDF5 = b"this is not an HDF5 file\n"


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
def test_frames_file_not_hdf5(tmp_path, dataset_factory, layout):
    root = dataset_factory(tmp_path / "d", layout, ("050",), NAMES_2025, N, (H, W))
    fp, _ = scan_paths(root, layout, "050", "LH_rotation")
    fp.write_bytes(NOT_HDF5)
    scan = open_data(root).scan("sub050__LH_rotation")
    for fn in (scan.read_frames, lambda: scan.shape, lambda: list(scan.iter_frames()), scan.read_tforms):
        expect_read_error(root, fn, fp, "cannot be opened as an HDF5 file")


def test_tforms_file_not_hdf5(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W))
    _, tp = scan_paths(root, EVAL, "050", "RH_rotation")
    tp.write_bytes(NOT_HDF5)
    scan = open_data(root).scan("sub050__RH_rotation")
    expect_read_error(root, scan.read_tforms, tp, "cannot be opened as an HDF5 file")
    assert scan.read_frames().shape == (N, H, W)


@pytest.mark.parametrize("spelling", ["landmark", "landmarks"])
def test_landmark_file_not_hdf5(tmp_path, dataset_factory, spelling):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W), spelling)
    path = root / spelling / "landmark_050.h5"
    path.write_bytes(NOT_HDF5)
    scan = open_data(root).scan("sub050__RH_rotation")
    expect_read_error(root, scan.read_landmarks, path, "cannot be opened as an HDF5 file")


def test_keys_file_not_hdf5(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", EVAL, ("050",), NAMES_2025, N, (H, W))
    (root / "dataset_keys.h5").write_bytes(NOT_HDF5)
    expect_read_error(
        root, lambda: open_data(root), root / "dataset_keys.h5", "cannot be opened as an HDF5 file"
    )


def test_write_landmarks_into_non_hdf5_file_loses_nothing(tmp_path):
    path = tmp_path / "landmarks" / "landmark_000.h5"
    path.parent.mkdir()
    path.write_bytes(NOT_HDF5)
    before = snapshot(tmp_path)
    expect_error(lambda: write_landmarks(path, {"LH_rotation": [[1, 2, 3]]}), path, "HDF5")
    assert snapshot(tmp_path) == before


def test_folder_with_neither_layout(tmp_path):
    (tmp_path / "landmarks").mkdir()
    (tmp_path / "calib_matrix.csv").write_text("x\n")
    expect_read_error(tmp_path, lambda: open_data(tmp_path), tmp_path, "frames_transfs/", "frames/")


def test_folder_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    expect_error(lambda: open_data(missing), missing, "not found")
    assert not missing.exists()


def test_data_folder_that_is_a_file(tmp_path):
    path = tmp_path / "data"
    path.write_text("x")
    expect_read_error(tmp_path, lambda: open_data(path), path, "not found")


# --------------------------------------------------------------------------- failed writes


def _bad_write(case: str):
    """(frames, tforms, expected message part) for write_scan."""
    frames, tforms = frames_for(N), tforms_for(N)
    if case == "more frames":
        return frames_for(N + 1), tforms, "frames"
    if case == "fewer frames":
        return frames_for(N - 1), tforms, "one per frame"
    if case == "float frames":
        return frames.astype(np.float32), tforms, "uint8"
    if case == "uint16 frames":
        return frames.astype(np.uint16), tforms, "uint8"
    if case == "2-D frames":
        return frames[0], tforms, "uint8"
    if case == "chunks of two sizes":
        return [frames[:3], frames_for(3, image_size=(H, W + 1))], tforms, "does not fit"
    if case == "one frame":
        return frames[:1], tforms[:1], "at least 2"
    if case == "NaN tforms":
        return frames, _nan_tforms(), "non-finite"
    if case == "Inf tforms":
        return frames, _inf_tforms(), "non-finite"
    if case == "singular tforms":
        return frames, np.zeros((N, 4, 4)), "singular"
    if case == "tforms (N,3,4)":
        return frames, tforms[:, :3], "(N, 4, 4)"
    raise AssertionError(case)


BAD_WRITES = [
    "more frames",
    "fewer frames",
    "float frames",
    "uint16 frames",
    "2-D frames",
    "chunks of two sizes",
    "one frame",
    "NaN tforms",
    "Inf tforms",
    "singular tforms",
    "tforms (N,3,4)",
]


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
@pytest.mark.parametrize("case", BAD_WRITES)
def test_failed_write_scan_leaves_nothing(tmp_path, layout, case):
    frames, tforms, _ = _bad_write(case)
    with pytest.raises(TusrecDataError):
        write_scan(tmp_path, layout, 0, "LH_rotation", frames, tforms)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
@pytest.mark.parametrize("case", BAD_WRITES)
def test_failed_write_scan_message(tmp_path, layout, case):
    """The message names the file that was to be written and what was expected."""
    frames, tforms, part = _bad_write(case)
    fp, tp = scan_paths(tmp_path, layout, "000", "LH_rotation")
    msg = expect_error(lambda: write_scan(tmp_path, layout, 0, "LH_rotation", frames, tforms), part)
    assert str(fp) in msg or str(tp) in msg, f"neither {fp} nor {tp} in message {msg!r}"


@pytest.mark.parametrize("layout", [TRAIN, EVAL])
@pytest.mark.parametrize("case", BAD_WRITES)
def test_failed_rewrite_keeps_good_scan(tmp_path, layout, case):
    good_frames, good_tforms = frames_for(N, 7), tforms_for(N, 8)
    write_scan(tmp_path, layout, 0, "LH_rotation", good_frames, good_tforms)
    before = snapshot(tmp_path)
    frames, tforms, _ = _bad_write(case)
    with pytest.raises(TusrecDataError):
        write_scan(tmp_path, layout, 0, "LH_rotation", frames, tforms)
    assert snapshot(tmp_path) == before  # same files, same bytes, no temporaries
    scan = open_data(tmp_path).scan("sub000__LH_rotation")
    assert np.array_equal(scan.read_frames(), good_frames)
    assert np.array_equal(scan.read_tforms(), good_tforms.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("table", [[1, 2, 3], [[1, 2]], [[1, 2, 3, 4]]])
def test_failed_write_landmarks_keeps_file(tmp_path, table):
    path = tmp_path / "landmark_000.h5"
    write_landmarks(path, {"LH_rotation": [[1, 2, 3]]})
    before = snapshot(tmp_path)
    expect_error(lambda: write_landmarks(path, {"RH_rotation": np.asarray(table)}), path, "(K, 3)")
    assert snapshot(tmp_path) == before
    missing = tmp_path / "landmark_001.h5"
    with pytest.raises(TusrecDataError):
        write_landmarks(missing, {"RH_rotation": np.asarray(table)})
    assert snapshot(tmp_path) == before


def test_failed_write_dataset_keys_writes_nothing(tmp_path):
    with pytest.raises(TusrecDataError):
        write_dataset_keys(tmp_path, ["sub050__LH_rotation", "LH_rotation"])
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- test layout (no transfs/)


def test_test_layout_has_no_tforms(testset_root):
    data = open_data(testset_root)
    assert not (testset_root / "transfs").exists()
    assert data.layout == EVAL
    assert data.keys == ["sub060__LH_rotation", "sub060__RH_rotation"]
    for scan in data.scans:
        assert scan.tforms_path is None
        assert not scan.has_tforms
        expect_read_error(testset_root, scan.read_tforms, scan.key, "no ground-truth transforms", "transfs/")
        assert scan.read_frames().shape == (N, H, W)  # the rest still reads
        assert scan.read_landmarks().shape == (5, 3)
