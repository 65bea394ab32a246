"""./evaluate show: poses from both prediction forms, per-frame errors, compounding, the page."""

from __future__ import annotations

import base64
import os
import re

import h5py
import numpy as np
import pandas as pd
import pytest

from tests import reference
from tusrec.cli import main
from tusrec.data import open_data
from tusrec.ddf import GroundTruth, write_predictions
from tusrec.geometry import compose_local, local_from_global, pose6_to_matrix
from tusrec.show.command import choose_scans
from tusrec.show.figures import ordinal, projection
from tusrec.show.poses import COMPACT, DENSE, ShowError, read_poses, rigid_fit
from tusrec.show.volume import Compounder, Volume, compound, frame_corners_mm, make_grid


def kabsch_svd(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent least-squares rigid fit (Arun et al. 1987, numpy SVD): (P,3),(P,3) -> (4,4)."""
    ms, md = src.mean(0), dst.mean(0)
    u, _, vt = np.linalg.svd((src - ms).T @ (dst - md))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    R = vt.T @ np.diag([1, 1, d]) @ u.T
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, md - R @ ms
    return T


def test_rigid_fit_matches_an_independent_kabsch(rng):
    src = np.concatenate([rng.uniform(0, 100, (50, 2)), np.zeros((50, 1))], axis=1)  # planar, as pixels
    poses = pose6_to_matrix(np.concatenate([rng.normal(0, 0.4, (3, 3)), rng.normal(0, 30, (3, 3))], 1))
    rigid = np.einsum("nij,pj->npi", poses[:, :3, :3], src) + poses[:, None, :3, 3]
    fitted, residual = rigid_fit(src, rigid)
    np.testing.assert_allclose(fitted, poses, atol=1e-9)
    np.testing.assert_allclose(residual, 0, atol=1e-9)
    # not a rigid motion (an affine stretch plus noise): the same fit as the SVD solution,
    # and the residual is the RMS distance left by it
    bent = rigid * np.array([1.1, 0.95, 1.0]) + rng.normal(0, 0.5, rigid.shape)
    fitted, residual = rigid_fit(src, bent)
    for k in range(3):
        T = kabsch_svd(src, bent[k])
        np.testing.assert_allclose(fitted[k], T, atol=1e-8)
        moved = src @ T[:3, :3].T + T[:3, 3]
        assert residual[k] == pytest.approx(np.sqrt(np.mean(np.sum((moved - bent[k]) ** 2, 1))), rel=1e-10)
        assert residual[k] > 0.3


def _predicted_transforms(gt: GroundTruth, rng) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth perturbed by a small rigid error per frame (global, local) float64."""
    noise = pose6_to_matrix(
        np.concatenate([rng.normal(0, 0.02, (len(gt.local), 3)), rng.normal(0, 1, (len(gt.local), 3))], 1)
    )
    local = gt.local @ noise
    return compose_local(local), local


def _write_compact(path, glob=None, local=None, form="transforms", **extra):
    with h5py.File(path, "w") as f:
        if form is not None:
            f.attrs["form"] = form
        if glob is not None:
            f["transforms_global"] = glob
        if local is not None:
            f["transforms_local"] = local
        for k, v in extra.items():
            f[k] = v


@pytest.fixture
def scan_and_files(tmp_path, dataset_factory, synth, rng):
    root = dataset_factory(tmp_path / "data", synth.EVAL, ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 7)
    data = open_data(root)
    scan = data.scans[0]
    gt = GroundTruth.from_scan(scan, data.calibration)
    glob, local = _predicted_transforms(gt, rng)
    pred = tmp_path / "pred"
    pred.mkdir()
    write_predictions(
        pred / f"{scan.key}.h5",
        glob,
        local,
        data.calibration,
        scan.image_size,
        extras={"uncertainty": np.linspace(0, 1e-6, len(glob))},
    )
    _write_compact(tmp_path / "compact.h5", glob, local)
    return data, scan, gt, glob, local, pred, tmp_path


def test_both_forms_give_the_same_poses_and_the_scored_per_frame_errors(scan_and_files):
    data, scan, gt, glob, local, pred, tmp = scan_and_files
    dense = read_poses(pred / f"{scan.key}.h5", scan, gt, pixel_step=3)
    compact = read_poses(tmp / "compact.h5", scan, gt)
    assert dense.form == DENSE and compact.form == COMPACT
    np.testing.assert_allclose(dense.global_, glob, atol=1e-4)  # a fit of float32 DDFs
    np.testing.assert_allclose(dense.local, local, atol=1e-4)
    np.testing.assert_array_equal(compact.global_, glob)
    assert dense.residual_global.max() < 1e-4 and compact.residual_global is None
    np.testing.assert_allclose(dense.uncertainty, np.linspace(0, 1e-6, len(glob)))
    # per-frame errors against brute-force loops over every pixel (tests/reference.py)
    h, w = scan.image_size
    tforms = scan.read_tforms()
    true_g = reference.global_ddfs(tforms, data.calibration, h, w)
    true_l = reference.local_ddfs(tforms, data.calibration, h, w)
    with h5py.File(pred / f"{scan.key}.h5") as f:
        gp, lp = f["GP"][()], f["LP"][()]
    for k in range(len(glob)):
        assert dense.gpe[k] == pytest.approx(reference.mean_point_error(true_g[k], gp[k]), rel=1e-5)
        assert dense.lpe[k] == pytest.approx(reference.mean_point_error(true_l[k], lp[k]), rel=1e-5)
    np.testing.assert_allclose(compact.gpe, dense.gpe, rtol=1e-5)
    np.testing.assert_allclose(compact.lpe, dense.lpe, rtol=1e-5)


def test_compact_files_with_one_set_of_matrices_derive_the_other(scan_and_files):
    _data, scan, gt, glob, local, _pred, tmp = scan_and_files
    _write_compact(tmp / "g.h5", glob=glob.astype(np.float32))
    _write_compact(tmp / "l.h5", local=local)
    only_g = read_poses(tmp / "g.h5", scan, gt)
    only_l = read_poses(tmp / "l.h5", scan, gt)
    np.testing.assert_allclose(only_g.local, local_from_global(glob.astype(np.float32)), atol=1e-12)
    np.testing.assert_allclose(only_l.global_, compose_local(local), atol=1e-12)
    np.testing.assert_allclose(only_g.global_, glob, atol=1e-4)


def test_the_expected_errors_source_is_shown_only_when_it_is_one_the_predictor_writes(scan_and_files):
    _data, scan, gt, glob, local, _pred, tmp = scan_and_files
    expected = np.full(len(local), 0.2)
    for value, shown in [
        ("error model", "error model"),
        (b"error heads", "error heads"),
        ("$\\frac{", ""),  # matplotlib mathtext that would not parse
        ("x" * 10_000, ""),
        (np.arange(3), ""),
        (np.array([(1, 2.0)], dtype=[("i", "i4"), ("f", "f8")]), ""),  # compound
        (np.array(["error model"], dtype=h5py.string_dtype()), "error model"),  # variable-length, (1,)
    ]:
        path = tmp / "source.h5"
        _write_compact(path, glob, local, expected_error_mm=expected)
        with h5py.File(path, "a") as f:
            f.attrs["expected_error_source"] = value
        poses = read_poses(path, scan, gt)
        assert poses.expected_error_source == shown
        np.testing.assert_allclose(poses.expected_error, expected)


def test_hostile_files_are_refused_with_a_reason(scan_and_files):
    _data, scan, gt, glob, _local, pred, tmp = scan_and_files
    cases = {}
    os.symlink(pred / f"{scan.key}.h5", tmp / "link.h5")
    cases["link.h5"] = "symbolic link"
    _write_compact(tmp / "noform.h5", glob, form=None)
    cases["noform.h5"] = "no dataset 'GP'"
    bad = glob.copy()
    bad[2, 0, 0] = np.nan
    _write_compact(tmp / "nan.h5", bad)
    cases["nan.h5"] = "NaN or Inf values (first in frame 3)"
    row = glob.copy()
    row[1, 3, 0] = 1e-3
    _write_compact(tmp / "row.h5", row)
    cases["row.h5"] = "last row"
    _write_compact(tmp / "shape.h5", glob[:-1])
    cases["shape.h5"] = "has shape"
    singular = glob.copy()
    singular[0, :3, :3] = 0
    _write_compact(tmp / "singular.h5", singular)
    cases["singular.h5"] = "not invertible"
    _write_compact(tmp / "empty.h5")
    cases["empty.h5"] = "without transforms_global or transforms_local"
    with h5py.File(tmp / "ext.h5", "w") as f:
        f.attrs["form"] = "transforms"
        f["transforms_global"] = h5py.ExternalLink(str(tmp / "compact.h5"), "transforms_global")
    cases["ext.h5"] = "is a link (ExternalLink"
    (tmp / "text.h5").write_text("not hdf5")
    cases["text.h5"] = "cannot be opened as an HDF5 file"
    with h5py.File(pred / f"{scan.key}.h5") as src, h5py.File(tmp / "nandense.h5", "w") as f:
        for name in ("GP", "LP"):
            f[name] = src[name][()]
        f["GP"][4, 1, 7] = np.inf
    cases["nandense.h5"] = "'GP' has NaN or Inf values (first in frame 5)"
    with h5py.File(pred / f"{scan.key}.h5") as src, h5py.File(tmp / "extdense.h5", "w") as f:
        for name in ("GP", "LP"):
            f[name] = src[name][()]
        f["uncertainty"] = h5py.ExternalLink(str(tmp / "elsewhere.h5"), "uncertainty")
    cases["extdense.h5"] = "'uncertainty' is a link (ExternalLink"
    with h5py.File(pred / f"{scan.key}.h5") as src, h5py.File(tmp / "softdense.h5", "w") as f:
        f["GP"] = src["GP"][()]
        f["LP"] = h5py.SoftLink("/GP")
    cases["softdense.h5"] = "'LP' is a link (SoftLink"
    for name, reason in cases.items():
        with pytest.raises(ShowError, match=re.escape(reason)):
            read_poses(tmp / name, scan, gt)


def test_compounding_puts_each_pixel_in_its_voxel(rng):
    from tusrec.geometry import default_calibration

    calib = default_calibration()
    ts = calib.T_scale
    h, w = 12, 16
    frames = rng.integers(0, 256, (1, h, w), dtype=np.uint8)
    corners = frame_corners_mm(np.zeros((0, 4, 4)), ts, (h, w))
    grid = make_grid([corners], voxel_mm=0.05)  # far finer than a pixel: one pixel a voxel
    c = Compounder(grid, ts, (h, w), pixel_step=1)
    c.add(np.eye(4)[None], frames)
    vol = c.volume()
    assert np.isfinite(vol.values).sum() == h * w and vol.outside == 0
    for y in range(1, h + 1):
        for x in range(1, w + 1):
            mm = np.array([x * ts[0, 0], y * ts[1, 1], 0.0])
            i, j, k = np.rint((mm - grid.origin) / grid.voxel_mm).astype(int)
            assert vol.values[i, j, k] == frames[0, y - 1, x - 1]
    # the mean of what falls in a voxel: a coarse grid keeps the frame's mean intensity
    coarse = make_grid([corners], voxel_mm=100.0)
    c = Compounder(coarse, ts, (h, w), pixel_step=1)
    c.add(np.eye(4)[None], frames)
    values = c.volume().values
    assert c.count.sum() == h * w
    np.testing.assert_allclose(np.nansum(values * c.count.reshape(values.shape)), frames.sum())


def test_the_grid_is_bounded_and_wild_predictions_are_counted_outside(scan_and_files):
    data, scan, gt, glob, _local, _pred, _tmp = scan_and_files
    wild = glob.copy()
    wild[3:, :3, 3] += 1e7  # a prediction that leaves for another galaxy
    true_v, wild_v = compound(
        scan, [gt.global_, wild], data.calibration.T_scale, voxel_mm=0.01, max_voxels=50_000
    )
    g = true_v.grid
    assert g.n_voxels <= 50_000 and g.voxel_mm > 0.01
    assert wild_v.outside / wild_v.splatted == pytest.approx(3 / 7, abs=0.02)  # frames 4..6 of 0..6
    assert true_v.outside == 0
    mip = projection(true_v, 2)
    assert mip.shape == g.shape[:2] and np.isfinite(mip).any()
    assert isinstance(true_v, Volume)


def test_worst_scans_are_chosen_by_gpe(eval_root):
    data = open_data(eval_root)
    gpe = {s.key: float(i) for i, s in enumerate(data.scans)}
    chosen = choose_scans(data, None, 2, gpe)
    assert [s.key for s in chosen] == [s.key for s in data.scans[::-1][:2]]
    assert len(choose_scans(data, None, 10, gpe)) == len(data.scans)
    keys = [data.scans[1].key]
    assert [s.key for s in choose_scans(data, keys, 1, None)] == keys


def test_show_command_writes_a_self_contained_page(scan_and_files, capsys, monkeypatch):
    from PIL import Image

    from tusrec.show import figures as sf

    data, _scan, _gt, _glob, _local, pred, tmp = scan_and_files
    other = data.scans[1]
    _write_compact(
        pred / f"{other.key}.h5", compose_local(GroundTruth.from_scan(other, data.calibration).local)
    )
    drawn = {}  # the Figures the command saved, by (key, kind)

    def keep(kind, draw):
        def wrapper(key, *args, **kwargs):
            drawn[key, kind] = fig = draw(key, *args, **kwargs)
            return fig

        return wrapper

    monkeypatch.setattr(sf, "trajectory_figure", keep("trajectory", sf.trajectory_figure))
    monkeypatch.setattr(sf, "reconstruction_figure", keep("reconstruction", sf.reconstruction_figure))
    out = tmp / "show"
    code = main(["evaluate", "show", str(pred), "--data", str(data.root), "--out", str(out), "--synthetic"])
    assert code == 0, capsys.readouterr()
    page = (out / "show.html").read_text()
    rows = pd.read_csv(out / "show.csv").set_index("key")
    ts = data.calibration.T_scale
    for s in data.scans:
        for kind in ("trajectory", "reconstruction"):
            png = out / f"{s.key}_{kind}.png"
            fig = drawn[s.key, kind]
            # the PNG is this figure (75 dpi), inlined in the page
            size = np.array(Image.open(png).size)
            assert (np.abs(size - fig.get_size_inches() * 75) < 1).all()
            assert base64.b64encode(png.read_bytes()).decode() in page
        # what the reconstruction draws: the volumes compounded here with the file's poses
        gt = GroundTruth.from_scan(s, data.calibration)
        poses = read_poses(pred / f"{s.key}.h5", s, gt)
        true_v, pred_v = compound(s, [gt.global_, poses.global_], ts)
        images = [ax.images[0] for ax in drawn[s.key, "reconstruction"].axes if ax.images]
        np.testing.assert_array_equal(
            np.ma.filled(images[0].get_array().astype(float), np.nan), projection(true_v, 2).T
        )
        np.testing.assert_array_equal(
            np.ma.filled(images[1].get_array().astype(float), np.nan), projection(pred_v, 2).T
        )
        row = rows.loc[s.key]
        assert (row["fill_voxels"], row["gaps_true"], row["gaps_predicted"]) == (
            true_v.fill,
            len(true_v.gaps),
            len(pred_v.gaps),
        )
    assert "SYNTHETIC DATA" in page and not re.search(r'src="(?!data:)', page)
    assert set(rows["form"]) == {"ddf", "transforms"}
    # a file that cannot be shown: exit 1, its row says why, the other scan is still shown
    (pred / f"{other.key}.h5").write_text("garbage")
    code = main(["evaluate", "show", str(pred), "--data", str(data.root), "--out", str(out)])
    assert code == 1
    assert "cannot be opened as an HDF5 file" in capsys.readouterr().err
    assert "not shown" in (out / "show.csv").read_text()


def test_ordinals():
    assert [ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 102)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "102nd"
    ]  # fmt: skip


def test_cli_defaults_are_the_modules_defaults():
    from tusrec.cli import build_parser
    from tusrec.show import command, volume

    argv = ["evaluate", "show", "pred", "--data", "d", "--out", "o"]
    args = build_parser(argv)[0].parse_args(argv)
    assert args.max_scans == command.DEFAULT_MAX_SCANS
    assert (args.voxel_mm, args.max_voxels, args.pixel_step) == (
        volume.DEFAULT_VOXEL_MM,
        volume.DEFAULT_MAX_VOXELS,
        volume.DEFAULT_PIXEL_STEP,
    )


class _Frames:
    """A scan's frames in memory, as compound reads them (image_size, iter_frames)."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        self.image_size = frames.shape[1:]
        self.key = "sub000__made_here"

    def iter_frames(self, chunk: int = 64, start: int = 0):
        for s in range(start, len(self.frames), chunk):
            yield s, self.frames[s : s + chunk]


def _stack(z_mm: np.ndarray) -> np.ndarray:
    """(N-1, 4, 4) T(i->0) of frames translated along frame 0's z to z_mm[i] (z_mm[0] = 0)."""
    poses = np.tile(np.eye(4), (len(z_mm) - 1, 1, 1))
    poses[:, 2, 3] = z_mm[1:]
    return poses


@pytest.fixture
def gapped(rng):
    """Twelve frames 0.75 mm apart along z (1.5 voxels of 0.5 mm), and 4 mm between the
    7th and the 8th (frames 6 and 7): a real gap."""
    from tusrec.geometry import default_calibration

    z = 0.75 * np.arange(12.0)
    z[7:] += 3.25
    frames = rng.integers(1, 256, (12, 20, 30), dtype=np.uint8)
    return _Frames(frames), _stack(z), default_calibration().T_scale, z


def test_hole_filling_closes_the_spacing_of_frames_and_leaves_real_gaps(gapped):
    from tusrec.show.volume import fill_voxels, frame_gaps

    scan, poses, ts, z = gapped
    np.testing.assert_allclose(frame_gaps(poses, ts, scan.image_size), np.diff(z), atol=1e-12)
    assert fill_voxels(np.diff(z), 0.5) == 1  # 0.75 mm apart: a voxel from either side closes it
    (vol,) = compound(scan, [poses], ts, voxel_mm=0.5, pixel_step=1)
    g = vol.grid
    assert g.voxel_mm == 0.5 and vol.fill == 1 and vol.reach_mm == pytest.approx(1.5)
    np.testing.assert_array_equal(vol.gaps, [6])
    np.testing.assert_allclose(vol.gap_mm, [4.0])
    np.testing.assert_allclose(vol.gap_mid[0, 2], (z[6] + z[7]) / 2)
    # along z through the frames' footprint: filled from frame 0 to 6 and from 7 to 11;
    # between 6 and 7 (4 mm, 8 voxels) the voxels more than one from a frame stay empty
    k = np.rint((z - g.origin[2]) / g.voxel_mm).astype(int)
    column = vol.values[g.shape[0] // 2, g.shape[1] // 2]
    assert np.isfinite(column[k[0] : k[6] + 2]).all() and np.isfinite(column[k[7] - 1 : k[11] + 1]).all()
    assert np.isnan(column[k[6] + 2 : k[7] - 1]).all() and k[7] - 1 - (k[6] + 2) == 5
    # splatting alone leaves every other voxel empty between neighbouring frames
    plain = Compounder(g, ts, scan.image_size, pixel_step=1)
    plain.add(np.concatenate([np.eye(4)[None], poses]), scan.frames)
    bare = plain.volume().values[g.shape[0] // 2, g.shape[1] // 2]
    assert np.isnan(bare[k[0] : k[6] + 1]).sum() >= 3
    # a splatted voxel keeps its own mean; an empty one gets the mean of the pixels
    # splatted into the 3 x 3 x 3 voxels around it (brute force over the neighbourhood)
    splatted = plain.count.reshape(g.shape) > 0
    np.testing.assert_array_equal(vol.values[splatted], plain.volume().values[splatted])
    total, count = plain.sum.reshape(g.shape), plain.count.reshape(g.shape)
    filled = np.argwhere(~splatted & np.isfinite(vol.values))
    for i, j, m in filled[:: max(1, len(filled) // 50)]:
        box = np.s_[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, max(m - 1, 0) : m + 2]
        assert vol.values[i, j, m] == pytest.approx(total[box].sum() / count[box].sum(), rel=1e-5)


def test_reconstruction_figure_draws_the_projections_and_marks_the_gaps(gapped):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tusrec.plotting import SYNTHETIC_LABEL
    from tusrec.show.figures import VIEWS, reconstruction_figure

    scan, poses, ts, _z = gapped
    spread = _stack(np.r_[0.0, 2.0 * np.arange(1, 12.0)])  # a prediction spreading its frames: 11 gaps
    true_v, pred_v = compound(scan, [poses, spread], ts, voxel_mm=0.5, pixel_step=1)
    assert len(pred_v.gaps) == 11 and pred_v.fill == true_v.fill  # the truth's fill for both
    fig = reconstruction_figure(scan.key, true_v, pred_v, synthetic=True, pixel_step=1)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    for r, (cut, hor, ver, name) in enumerate(VIEWS):
        for ax, vol, label in zip(
            panels[2 * r : 2 * r + 2], (true_v, pred_v), ("true", "predicted"), strict=True
        ):
            assert ax.get_title() == f"{label} poses: {name}"
            want = projection(vol, cut)
            drawn = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
            np.testing.assert_array_equal(drawn, want.T if hor < ver else want)
            marks = [c for c in ax.collections if c.get_gid() == "gaps"]
            assert len(marks) == 1
            np.testing.assert_allclose(marks[0].get_offsets(), vol.gap_mid[:, [hor, ver]])
    caption = " ".join(fig._supxlabel.get_text().split())  # wrapped to the figure's width
    assert "within 1 voxel(s) (closes gaps between neighbouring frames under 1.5 mm)" in caption
    assert "true poses: 1 gap(s)" in caption and "widest 4.0 mm, between frames 6 and 7" in caption
    assert "predicted poses: 11 gap(s)" in caption
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for sub in fig.subfigs for t in sub.texts]
    label = (
        next(t for t in texts if t.get_text() == SYNTHETIC_LABEL).get_bbox_patch().get_window_extent(renderer)
    )
    title = next(t for t in texts if t.get_text().startswith(scan.key)).get_window_extent(renderer)
    assert label.x1 < title.x0 and label.y0 < title.y1 and title.y0 < label.y1
    assert title.get_points()[1, 1] <= fig.bbox.y1
    caption = fig._supxlabel.get_window_extent(renderer)
    assert caption.x0 >= 0 and caption.x1 <= fig.bbox.x1  # the whole caption inside the figure


def test_trajectory_figure_draws_the_corners_and_the_per_frame_errors(scan_and_files):
    from tusrec.show.figures import trajectory_figure

    data, scan, gt, _glob, _local, _pred, tmp = scan_and_files
    poses = read_poses(tmp / "compact.h5", scan, gt)
    ts = data.calibration.T_scale
    fig = trajectory_figure(scan.key, poses, gt.global_, ts, scan.image_size, synthetic=False)
    ax3 = fig.axes[0]
    lines = ax3.get_lines()
    for corner, colour in ((frame_corners_mm(gt.global_, ts, scan.image_size), "0.15"),):
        for c in range(4):  # the first four lines: the true corners' tracks, plotted as (x, z, y)
            x, y, zz = lines[c].get_data_3d()
            np.testing.assert_allclose(np.c_[x, zz, y], corner[:, c], atol=1e-9)
            assert lines[c].get_color() == colour
    gpe_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "GPE per frame (mm)")
    np.testing.assert_allclose(gpe_ax.get_lines()[0].get_ydata(), poses.gpe)
    assert gpe_ax.get_title() == f"global pixel error: mean {poses.gpe.mean():.2f} mm"
    assert fig._suptitle.get_text().startswith(f"{scan.key}: trajectory, true against predicted")
