"""./predict --model: a team's model of each kind (template function, rigid function, class)
from a file outside the package, what the kit writes from it against an independent
computation, and what the kit guarantees around it (a model that raises, returns the
wrong thing or hangs costs its scan only; load once; GPU memory released; resume)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tusrec.data import open_data, write_manifest
from tusrec.predict import core, interface, predict_folder
from tusrec.predict.interface import ModelSpecError, load_model
from tusrec.scoring import score_predictions

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["GPE", "GLE", "LPE", "LLE"]

# A team's helper module, imported by its model files as a sibling ("from motion import ...").
# hand_ddfs is also the tests' independent computation of GP/GL/LP/LL from local
# transforms, written from docs/conventions.md section 2 (no tusrec code).
MOTION = '''
import numpy as np


def local_motion(n):
    """(n-1, 4, 4) T(i->i-1): a rotation about z then x and a translation, varying by frame."""
    k = np.arange(1, n, dtype=np.float64)
    a, b = 0.02 * np.sin(k), 0.015 * np.cos(0.7 * k)
    Rz = np.zeros((n - 1, 3, 3)); Rz[:, 2, 2] = 1
    Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    Rx = np.zeros((n - 1, 3, 3)); Rx[:, 0, 0] = 1
    Rx[:, 1, 1], Rx[:, 1, 2], Rx[:, 2, 1], Rx[:, 2, 2] = np.cos(b), -np.sin(b), np.sin(b), np.cos(b)
    T = np.tile(np.eye(4), (n - 1, 1, 1))
    T[:, :3, :3] = Rz @ Rx
    T[:, :3, 3] = np.stack([0.3 + 0 * k, -0.1 * np.cos(k), 0.05 * k], axis=1)
    return T


def read_t_scale(path):
    rows = [r for r in open(path).read().splitlines() if r.strip()]
    return np.array([[float(v) for v in r.split(",")] for r in rows[1:5]])


def hand_ddfs(local, t_scale, h, w, landmark):
    """GP, GL, LP, LL (float64) from local transforms, pixel by pixel as the conventions say."""
    n1 = len(local)
    glob = [local[0]]
    for T in local[1:]:
        glob.append(glob[-1] @ T)
    glob = np.array(glob)
    y, x = np.divmod(np.arange(h * w), w)  # flat index k = (y-1) W + (x-1), 1-based x, y
    p = np.stack([x + 1.0, y + 1.0, np.zeros(h * w), np.ones(h * w)])  # (4, H*W)
    q = t_scale @ p
    GP = np.stack([(glob[i] @ q - q)[:3] for i in range(n1)])
    LP = np.stack([(local[i] @ q - q)[:3] for i in range(n1)])
    lm = np.asarray(landmark, dtype=np.int64).reshape(-1, 3)
    flat = (lm[:, 2] - 1) * w + lm[:, 1] - 1
    GL = GP[lm[:, 0] - 1, :, flat].T.reshape(3, len(lm))
    LL = LP[lm[:, 0] - 1, :, flat].T.reshape(3, len(lm))
    return GP, GL, LP, LL
'''

TEMPLATE = """
import numpy as np
from motion import hand_ddfs, local_motion, read_t_scale


def predict_ddfs(frames, landmark, data_path_calib, device):
    n, h, w = frames.shape
    out = hand_ddfs(local_motion(n), read_t_scale(data_path_calib), h, w, landmark)
    return tuple(a.astype(np.float32) for a in out)
"""

RIGID = """
from motion import local_motion


def transforms(frames, device):
    return local_motion(len(frames))
"""

CLASS = """
from motion import local_motion

LOADS = []
CALLS = []


class Model:
    def load(self, device):
        LOADS.append(str(device))

    def transforms(self, frames):
        CALLS.append(len(frames))
        return local_motion(len(frames))
"""


@pytest.fixture
def team(tmp_path):
    folder = tmp_path / "team"
    folder.mkdir()
    for name, text in (("motion", MOTION), ("template", TEMPLATE), ("rigid", RIGID), ("klass", CLASS)):
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


@pytest.fixture
def motion(team):
    """The team's helper module, for the tests' own computations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("motion_for_tests", team / "motion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data_root(dataset_factory, tmp_path):
    return dataset_factory(
        tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD", "LH_rotation"), 9
    )


def quiet(*args):
    pass


def predict_command(*args, **kwargs):
    return subprocess.run(
        [str(ROOT / "predict"), "--device", "cpu", *map(str, args)], capture_output=True, text=True, **kwargs
    )


def write_by_hand(folder: Path, arrays: dict[str, tuple]):
    """A dense predictions folder written with h5py alone: GP, GL, LP, LL as given."""
    folder.mkdir(parents=True)
    for key, (GP, GL, LP, LL) in arrays.items():
        with h5py.File(folder / f"{key}.h5", "w") as f:
            for name, arr in (("GP", GP), ("GL", GL), ("LP", LP), ("LL", LL)):
                f.create_dataset(name, data=arr)
    rows = [{"key": k, "frames": len(a[0]) + 1, "status": "ok", "seconds": 1.0} for k, a in arrays.items()]
    write_manifest(folder, rows)


def scores(folder, data, out):
    table = score_predictions(folder, data, out).set_index("key").sort_index()
    assert (table["status"] == "ok").all(), table["message"].tolist()
    return table[METRICS]


# ----------------------------------------------------------------------------- the kinds


def test_the_organisers_template_from_a_file_runs_through_predict_and_scores_as_written_by_hand(
    team, motion, data_root, tmp_path
):
    """The template signature, untouched, in a file outside the package that imports a module
    beside it; ./predict writes its arrays, which score as the same arrays written by hand.
    The default --format (transforms) does not apply to a model returning dense DDFs: the
    files are dense, and the command says so."""
    run = predict_command(
        "--input", data_root, "--output", tmp_path / "pred", "--model", f"{team}/template.py:predict_ddfs"
    )
    assert run.returncode == 0, run.stderr
    assert "3 of 3 scans predicted" in run.stdout
    assert "dense" in run.stdout + run.stderr
    data = open_data(data_root)
    ts = motion.read_t_scale(data.calibration_path)
    by_hand = {}
    for scan in data.scans:
        n, h, w = scan.shape
        arrays = motion.hand_ddfs(motion.local_motion(n), ts, h, w, scan.read_landmarks())
        by_hand[scan.key] = tuple(a.astype(np.float32) for a in arrays)
        with h5py.File(tmp_path / "pred" / f"{scan.key}.h5") as f:
            assert f.attrs["form"] == "ddf" and f.attrs["model"] == f"{team}/template.py:predict_ddfs"
            for name, arr in zip(("GP", "GL", "LP", "LL"), by_hand[scan.key], strict=True):
                np.testing.assert_array_equal(f[name][()], arr, err_msg=name)
    write_by_hand(tmp_path / "hand", by_hand)
    kit = scores(tmp_path / "pred", data, tmp_path / "s1")
    hand = scores(tmp_path / "hand", data, tmp_path / "s2")
    pd.testing.assert_frame_equal(kit, hand)
    assert (kit["GPE"] > 0.1).all()  # a real motion, far from the ground truth's


@pytest.mark.parametrize("form", ["ddf", "transforms"])
def test_a_rigid_model_s_transforms_become_the_dense_and_compact_forms(
    team, motion, data_root, tmp_path, form
):
    """The kit's files from a rigid model: the transforms as given (float64), the globals
    their running product, GP/LP/GL/LL as the conventions' formulas give them pixel by pixel;
    both forms score as the same DDFs written by hand (compact within 1e-5 mm, dense exactly)."""
    model = load_model(f"{team}/rigid.py:transforms", form)
    assert model.kind == "rigid" and model.form == form
    rows = predict_folder(data_root, tmp_path / form, device="cpu", log=quiet, model=model)
    assert [r["status"] for r in rows] == ["ok"] * 3 and all(r["message"] == "" for r in rows)
    data = open_data(data_root)
    ts = data.calibration.T_scale
    by_hand = {}
    for scan in data.scans:
        n, h, w = scan.shape
        local = motion.local_motion(n)
        GP, GL, LP, LL = motion.hand_ddfs(local, ts, h, w, scan.read_landmarks())
        by_hand[scan.key] = tuple(a.astype(np.float32) for a in (GP, GL, LP, LL))
        with h5py.File(tmp_path / form / f"{scan.key}.h5") as f:
            assert f.attrs["form"] == form and ("GP" in f) == (form == "ddf")
            np.testing.assert_array_equal(f["transforms_local"][()], local)
            chained = local[0]
            for i in range(1, n - 1):
                chained = chained @ local[i]
            np.testing.assert_allclose(f["transforms_global"][-1], chained, rtol=0, atol=1e-12)
            np.testing.assert_allclose(f["GL"][()], GL, atol=1e-5)
            np.testing.assert_allclose(f["LL"][()], LL, atol=1e-5)
            if form == "ddf":
                np.testing.assert_allclose(f["GP"][()], GP, atol=1e-5)
                np.testing.assert_allclose(f["LP"][()], LP, atol=1e-5)
    write_by_hand(tmp_path / "hand", by_hand)
    kit = scores(tmp_path / form, data, tmp_path / "s1")
    hand = scores(tmp_path / "hand", data, tmp_path / "s2")
    pd.testing.assert_frame_equal(kit, hand, rtol=0, atol=1e-5)
    assert (kit["GPE"] > 0.1).all()


def test_a_class_is_loaded_once_per_run_not_per_scan(team, data_root, tmp_path, monkeypatch):
    """NAME a class in an importable module (module:NAME): instantiated and load(device)
    once for the run, transforms(self, frames) once per scan."""
    monkeypatch.syspath_prepend(str(team))
    model = load_model("klass:Model", "transforms")
    rows = predict_folder(data_root, tmp_path / "pred", device="cpu", log=quiet, model=model)
    assert [r["status"] for r in rows] == ["ok"] * 3
    import klass

    assert klass.LOADS == ["cpu"] and klass.CALLS == [9, 9, 9]
    assert model.loads == 1


# --------------------------------------------------------------- a foreign model's failures

FAULTS = {
    # fault: (kind, what the second scan's call does, status, words of the message)
    "raises": (
        "rigid",
        "raise ZeroDivisionError('my bug')",
        "failed",
        "ZeroDivisionError: my bug (at faulty.py:",
    ),
    "exits": ("rigid", "sys.exit(3)", "failed", "the model called sys.exit(3)"),
    "shape": ("rigid", "return good[:-1]", "failed", "has shape (7, 4, 4), expected (8, 4, 4)"),
    "dtype": (
        "rigid",
        "return good.astype(np.float16)",
        "failed",
        "has dtype float16, expected float32 or float64",
    ),
    "nan": (
        "rigid",
        "good[3, 0, 1] = np.nan; return good",
        "failed",
        "not finite (NaN or infinity) in 1 of 8 rows, the first at row 3",
    ),
    "not homogeneous": (
        "rigid",
        "good[5, 3, 0] = 0.5; return good",
        "failed",
        "row 5 has last row [0.5, 0.0, 0.0, 1.0]",
    ),
    "tensor": (
        "rigid",
        "return torch.from_numpy(good)",
        "failed",
        "is a torch.Tensor, expected a numpy array",
    ),
    "hangs": ("rigid", "HANG.wait(60); return good", "timeout", "did not return within"),
    "template shape": (
        "template",
        "return good[0][:, :2], good[1], good[2], good[3]",
        "failed",
        "GP has shape (8, 2, 768), expected (8, 3, 768)",
    ),
    "template three": (
        "template",
        "return tuple(good[:3])",
        "failed",
        "a tuple of 3, expected a tuple of 4 arrays",
    ),
    "template nan": (
        "template",
        "good[2][6, 1, 5] = np.inf; return good",
        "failed",
        "LP is not finite (NaN or infinity) at row 6",
    ),
    "template GL": (
        "template",
        "good[1][0, 2] = np.nan; return good",
        "failed",
        "GL (columns: landmarks) is not finite",
    ),
}


def faulty_model(folder: Path, kind: str, fault: str) -> Path:
    """A model whose second call does ``fault`` (its other calls are the clean model's)."""
    signature = "frames, landmark, data_path_calib, device" if kind == "template" else "frames, device"
    clean = (
        "predict_ddfs(frames, landmark, data_path_calib, device)"
        if kind == "template"
        else "local_motion(len(frames))"
    )
    source = f"""
        import sys, threading
        import numpy as np
        import torch
        from motion import local_motion
        from template import predict_ddfs

        CALLS = []
        HANG = threading.Event()

        def model({signature}):
            CALLS.append(1)
            good = {clean}
            if len(CALLS) == 2:
                good = [np.array(a) for a in good] if isinstance(good, tuple) else good
                {fault}
            return good
    """
    path = folder / "faulty.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_foreign_model_s_failure_costs_its_scan_only(team, data_root, tmp_path, monkeypatch, fault):
    kind, code, status, words = FAULTS[fault]
    path = faulty_model(team, kind, code)
    monkeypatch.setattr(core, "hang_grace_s", lambda limit: 0.5)  # give up on a hang soon
    predict_folder(
        data_root,
        tmp_path / "clean",
        device="cpu",
        log=quiet,
        model=load_model(
            f"{team}/{kind}.py:{'predict_ddfs' if kind == 'template' else 'transforms'}", "transforms"
        ),
        time_limit_s=5.0,
    )
    model = load_model(f"{path}:model", "transforms")
    try:
        rows = predict_folder(
            data_root, tmp_path / "pred", device="cpu", log=quiet, model=model, time_limit_s=5.0
        )
    finally:
        sys.modules[model.obj.__module__].HANG.set()  # let a hung call end
    data = open_data(data_root)
    bad = data.keys[1]
    by_key = {r["key"]: r for r in rows}
    assert by_key[bad]["status"] == status and words in by_key[bad]["message"], by_key[bad]["message"]
    assert not (tmp_path / "pred" / f"{bad}.h5").exists()
    assert not list((tmp_path / "pred").glob(".*.tmp"))
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv").set_index("key")
    assert table.loc[bad, "status"] == status
    for key in (data.keys[0], data.keys[2]):
        assert by_key[key]["status"] == "ok" and by_key[key]["message"] == ""
        with (
            h5py.File(tmp_path / "pred" / f"{key}.h5") as f,
            h5py.File(tmp_path / "clean" / f"{key}.h5") as g,
        ):
            assert sorted(f) == sorted(g)
            for name in f:
                np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
    if fault == "hangs":
        assert by_key[bad]["seconds"] < 5.0 + 0.5 + 3.0  # given up on, not waited for


def test_memory_is_released_after_every_scan_on_cuda(team, data_root, tmp_path, monkeypatch):
    """The CUDA code path, run on the CPU with torch.cuda's calls recorded: the peak is
    reset before each scan and read into the manifest, and the cache emptied after each,
    a failed scan's too (and its reference cycles collected first)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(core.gc, "collect", lambda *a: calls.append("collect"))
    path = faulty_model(team, "rigid", "raise RuntimeError('CUDA out of memory')")
    rows = predict_folder(
        data_root, tmp_path / "pred", device="cuda", log=quiet, model=load_model(f"{path}:model")
    )
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    # reference cycles collected after the failed scan only (its traceback holds its frames)
    assert calls == ["reset", "empty", "reset", "collect", "empty", "reset", "empty"]
    assert all(r["gpu_peak_MB"] == 3 and r["device"] == "cuda" for r in rows)
    assert "RuntimeError: CUDA out of memory" in rows[1]["message"]


def test_resume_keeps_this_model_s_files_and_redoes_another_s(team, data_root, tmp_path):
    out = tmp_path / "pred"
    spec = f"{team}/rigid.py:transforms"
    data = open_data(data_root)
    predict_folder(data_root, out, device="cpu", log=quiet, model=load_model(spec, "transforms"))
    mtimes = {k: (out / f"{k}.h5").stat().st_mtime_ns for k in data.keys}
    said = []
    predict_folder(data_root, out, device="cpu", log=said.append, model=load_model(spec, "transforms"))
    assert said == [f"kept 3 scan(s) this model had already predicted in {out}"]
    assert {k: (out / f"{k}.h5").stat().st_mtime_ns for k in data.keys} == mtimes
    # The same file edited (its sha256 changes): another model.
    (team / "rigid.py").write_text((team / "rigid.py").read_text() + "\n# retrained\n")
    said.clear()
    predict_folder(data_root, out, device="cpu", log=said.append, model=load_model(spec, "transforms"))
    assert said == [] and all((out / f"{k}.h5").stat().st_mtime_ns != mtimes[k] for k in data.keys)
    # A version attribute (weights changed, the file not): another model.
    model = load_model(spec, "transforms")
    before = model.fingerprint
    model.obj.version = "weights of 2025-06-01"
    assert model.fingerprint != before
    # The other form, and the same file under another kind, are other models too.
    first = load_model(spec, "transforms").fingerprint
    assert load_model(spec, "ddf").fingerprint != first
    assert load_model(f"{team}/template.py:predict_ddfs", "transforms").fingerprint != first


def test_model_spec_errors_are_one_line_each(team, tmp_path):
    (team / "broken.py").write_text("import numpy\nraise ImportError('needs cupy')\n")
    (team / "odd.py").write_text(
        "def model(images, calib):\n    pass\n\nclass Both:\n    def transforms(self, frames): pass\n"
        "    def predict_ddfs(self, frames, landmark, data_path_calib): pass\n"
    )
    cases = {
        f"{team}/nowhere.py:f": "no file",
        f"{team}/rigid.py": "expected path/to/file.py:NAME",
        f"{team}/rigid.py:missing": "has no 'missing' (it has",
        f"{team}/broken.py:f": "raised ImportError: needs cupy (at broken.py:2)",
        f"{team}/odd.py:model": "takes (images, calib); expected a function predict_ddfs",
        f"{team}/odd.py:Both": "defines both",
        "no_such_module_anywhere:f": "no module or file named no_such_module_anywhere",
    }
    for spec, words in cases.items():
        with pytest.raises(ModelSpecError, match=None) as err:
            load_model(spec)
        assert words in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))
    run = predict_command("--input", tmp_path, "--output", tmp_path / "p", "--model", f"{team}/odd.py:model")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "takes (images, calib)" in run.stderr


def test_the_template_s_device_is_optional_and_other_parameters_need_defaults():
    def template_2024(frames, landmark, data_path_calib):
        pass

    def rigid(frames, device=None, scale=1.0):
        pass

    def needs_more(frames, device, weights):
        pass

    assert interface.function_kind(template_2024) == "template"
    assert interface.function_kind(rigid) == "rigid"
    assert interface.function_kind(needs_more) is None
    # The kit's own template interface is a template-kind model (device and scan_name optional).
    from tusrec.predict import predict_ddfs

    assert interface.function_kind(predict_ddfs) == "template"


# ----------------------------------------------------------------------- the command


def test_a_device_that_is_not_there_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = subprocess.run(
        [
            str(ROOT / "predict"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "p"),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "--device cuda" in run.stderr and "cpu" in run.stderr and "Traceback" not in run.stderr
    odd = predict_command("--input", tmp_path, "--output", tmp_path / "p", "--device", "gpu")
    assert odd.returncode == 2 and odd.stderr.count("\n") == 1 and "--device gpu" in odd.stderr


@pytest.mark.parametrize("limit", ["0", "-5", "nan"])
def test_a_non_positive_time_limit_is_refused(tmp_path, limit):
    run = predict_command("--input", tmp_path, "--output", tmp_path / "p", "--time-limit", limit)
    assert run.returncode == 2 and "--time-limit" in run.stderr and "positive" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "p").exists()


def test_a_time_limit_too_short_to_predict_is_said_plainly(team, data_root, tmp_path):
    said = []
    rows = predict_folder(
        data_root,
        tmp_path / "p",
        device="cpu",
        log=said.append,
        time_limit_s=0.5,
        model=load_model(f"{team}/rigid.py:transforms", "transforms"),
    )
    assert any("--time-limit 0.5 s is shorter than the 2 s kept for writing" in s for s in said)
    assert all("the time limit (0.5 s) leaves the model no time" in r["message"] for r in rows)


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(team, data_root, tmp_path):
    """SIGINT while the model predicts the second scan: one line, exit 130, the first
    scan's file and manifest row kept, no file of the second; the rerun keeps the first."""
    (team / "slow.py").write_text(
        "import os, time\nfrom motion import local_motion\nCALLS = []\n\n"
        "def transforms(frames, device):\n    CALLS.append(1)\n"
        "    if len(CALLS) == 2 and os.environ.get('SLOW'):\n        time.sleep(60)\n"
        "    return local_motion(len(frames))\n"
    )
    out = tmp_path / "p"
    proc = subprocess.Popen(
        [
            str(ROOT / "predict"),
            "--input",
            str(data_root),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--model",
            f"{team}/slow.py:transforms",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLOW": "1"},
    )
    first = out / f"{open_data(data_root).keys[0]}.h5"
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert first.exists(), proc.communicate()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.glob("*.h5")) == [first.name]
    assert not list(out.glob(".*.tmp"))
    assert list(pd.read_csv(out / "predictions.csv")["key"]) == [first.stem]
    mtime = first.stat().st_mtime_ns
    rerun = predict_command("--input", data_root, "--output", out, "--model", f"{team}/slow.py:transforms")
    assert rerun.returncode == 0 and "kept 1 scan(s)" in rerun.stdout and "3 of 3" in rerun.stdout
    assert first.stat().st_mtime_ns == mtime


def test_a_class_whose_load_raises_ends_the_run_with_one_line(team, data_root, tmp_path):
    (team / "heavy.py").write_text(
        "class Model:\n    def load(self, device):\n        raise FileNotFoundError('weights.pt')\n"
        "    def transforms(self, frames):\n        pass\n"
    )
    with pytest.raises(
        ModelSpecError, match=r"loading it raised FileNotFoundError: weights.pt \(at heavy.py:3\)"
    ):
        predict_folder(
            data_root, tmp_path / "p", device="cpu", log=quiet, model=load_model(f"{team}/heavy.py:Model")
        )
    assert not list((tmp_path / "p").glob("*.h5"))


def test_check_device_names_what_is_there(monkeypatch):
    assert core.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        core.check_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert core.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ValueError, match=r"--device cuda:3: there are 2 CUDA device\(s\) here: cuda:0, cuda:1"
    ):
        core.check_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="the only device here is cpu"):
        core.check_device("cuda")


def test_the_command_ends_after_a_hang_even_if_the_model_started_threads_of_its_own(
    team, data_root, tmp_path
):
    """A call given up on that waits on a (non-daemon) thread of its own: the interpreter
    would wait for that thread at exit; the command ends when the run is done."""
    (team / "stuck.py").write_text(
        "import threading, time\nfrom motion import local_motion\nCALLS = []\n\n"
        "def transforms(frames, device):\n    CALLS.append(1)\n    if len(CALLS) == 2:\n"
        "        worker = threading.Thread(target=time.sleep, args=(120,))\n"
        "        worker.start()\n        worker.join()\n    return local_motion(len(frames))\n"
    )
    t0 = time.monotonic()
    run = predict_command(
        "--input",
        data_root,
        "--output",
        tmp_path / "p",
        "--model",
        f"{team}/stuck.py:transforms",
        "--time-limit",
        "1",
        timeout=100,
    )
    assert run.returncode == 1 and time.monotonic() - t0 < 100
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert list(table["status"]) == ["ok", "timeout", "ok"]
    assert "did not return within" in table.loc[1, "message"]
