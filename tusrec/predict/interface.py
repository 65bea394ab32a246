"""The model interface of ``./predict --model SPEC``: what a team's model is, and what the
kit does around it (docs/participants/your-model.md is the user's page).

``SPEC`` is ``path/to/file.py:NAME`` or ``importable.module:NAME``. NAME is one of three
kinds, told apart by what it is (never by guessing from its output):

1. **template function** ``predict_ddfs(frames, landmark, data_path_calib[, device])`` ->
   ``(GP, GL, LP, LL)``: the organisers' signature, called as is;
2. **rigid function** ``transforms(frames[, device])`` -> (N-1, 4, 4) T(i->i-1), from which
   the kit writes the dense or the compact form;
3. **a class**, instantiated with no arguments and ``load(self, device)`` once per run,
   then per scan ``transforms(self, frames)`` (rigid) or
   ``predict_ddfs(self, frames, landmark, data_path_calib)`` (template).

Inside the kit every model, the shipped ensemble included (tusrec.predict.core.Predictor),
is a :class:`Model`: ``load(device)`` once, then ``predict(...)`` per scan returning a
:class:`RigidPrediction` or a :class:`DensePrediction`. tusrec.predict.core.run_scan runs
it under the scan's time limit on a thread of its own (:class:`ModelThread`), checks what
it returned, writes the file and turns any failure into that scan's manifest row.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tusrec.data import DDF_FORM, PREDICTION_FORMS, Scan
from tusrec.geometry import Calibration

TEMPLATE_PARAMETERS = ("frames", "landmark", "data_path_calib")  # then optionally device
RIGID_PARAMETERS = ("frames",)  # then optionally device
LAST_ROW_TOLERANCE = 1e-6  # the compact form's validity rule (docs/conventions.md section 5.2)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
KIT_DIR = Path(__file__).resolve().parents[1]  # tusrec/


class ModelSpecError(Exception):
    """``--model SPEC`` cannot be used (no such file or name, import failed, not one of the
    three kinds): one line naming SPEC and what was expected."""


class ModelError(Exception):
    """What a model did on one scan that costs it that scan (status 'failed')."""


class ModelOutputError(ModelError):
    """A model returned something the interface does not allow (type, shape, dtype, NaN)."""


class ModelRaisedError(ModelError):
    """A model's own code raised; the message names the exception and where."""


class ModelTimeoutError(ModelError):
    """A model call did not return by the time the kit gives up on it (status 'timeout')."""


@dataclass
class RigidPrediction:
    """A rigid model's prediction of one scan.

    local: (N-1, 4, 4) T(i->i-1) in image mm (docs/conventions.md section 2), row i the
    transform from frame i+1 to frame i; float32 or float64 (kept as float64).
    extras: optional per-frame arrays for the file (e.g. ``uncertainty`` (N-1,));
    attrs: file attributes; notes: for the manifest's message; columns: manifest columns.
    """

    local: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    columns: dict = field(default_factory=dict)


@dataclass
class DensePrediction:
    """A template model's prediction of one scan, float32 or float64 mm:
    GP, LP (N-1, 3, H*W), GL, LL (3, K) (docs/conventions.md section 2)."""

    GP: np.ndarray
    GL: np.ndarray
    LP: np.ndarray
    LL: np.ndarray
    notes: list[str] = field(default_factory=list)
    columns: dict = field(default_factory=dict)


class Model:
    """A model as the kit runs it: ``load(device)`` once per run, ``predict`` per scan.

    ``form``: the form its files are written in ('ddf' or 'transforms'; a template model
    returns dense DDFs, so always 'ddf'). ``name``: the files' attribute ``model``.
    ``fingerprint``: 16 hex digits that change with whatever the predictions depend on
    (with the form); a rerun keeps only files carrying the same one.
    """

    form: str = DDF_FORM
    name: str = "model"

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def load(self, device) -> None:
        """Put the model on ``device`` (a torch.device): once per run, before any scan."""

    def predict(
        self,
        scan: Scan,
        calib: Calibration,
        deadline: float,
        landmarks: np.ndarray | None,
        calib_path: Path | None,
    ) -> RigidPrediction | DensePrediction:
        """One scan. ``deadline``: time.perf_counter() value by which the model should be
        done (the scan's limit less the time kept for writing); a model may ignore it, the
        kit measures. ``landmarks``: (K, 3) int64 rows (frame, x, y), None if the scan has
        none. ``calib_path``: the data's calib_matrix.csv."""
        raise NotImplementedError


def describe_exception(err: BaseException, home: Path | None = None) -> str:
    """'ValueError: message (at model.py:12)': the exception and where it was raised: the
    innermost frame in ``home`` (the model's folder), else the innermost one outside this
    kit, the Python installation and the virtual environment."""
    frames = traceback.extract_tb(err.__traceback__)
    skip = tuple(str(Path(p).resolve()) for p in {KIT_DIR, sys.prefix, sys.base_prefix, sys.exec_prefix})

    def outside(f) -> bool:
        return not f.filename.startswith("<") and not str(Path(f.filename).resolve()).startswith(skip)

    inside_home = [f for f in frames if home is not None and Path(f.filename).resolve().is_relative_to(home)]
    candidates = inside_home or [f for f in frames if outside(f)]
    where = f" (at {Path(candidates[-1].filename).name}:{candidates[-1].lineno})" if candidates else ""
    if isinstance(err, SystemExit):
        return f"sys.exit({err.code!r}){where}"
    text = " ".join(str(err).split())[:300]
    return f"{type(err).__name__}{': ' + text if text else ''}{where}"


class ModelThread:
    """Runs a model's calls one after another on a thread of its own, so that the run can
    give up on a call at a deadline and go on.

    A Python thread cannot be stopped from outside: a call given up on keeps running (and
    holds its memory, CPU or GPU) until it returns or the process ends; its result is then
    dropped. The next call gets a new thread. The threads are daemons, so a call that never
    returns does not keep the process alive at its end. load() and the scans' predict()
    run on the same thread (until one is given up on), so thread-local state a model sets
    in load() (torch's grad mode, a CUDA device) holds for its scans.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue | None = None
        self.abandoned = 0  # calls given up on (threads still running them)

    def _start(self) -> queue.SimpleQueue:
        jobs: queue.SimpleQueue = queue.SimpleQueue()

        def serve() -> None:
            while (job := jobs.get()) is not None:
                fn, box, done = job
                try:
                    box.append((True, fn()))
                except BaseException as err:
                    box.append((False, err))
                del fn, job
                done.set()

        threading.Thread(target=serve, name="tusrec-model", daemon=True).start()
        return jobs

    def call(self, fn, give_up_at: float | None = None):
        """``fn()`` on the model's thread; its value, or its exception re-raised here
        (a BaseException that is not an Exception, e.g. SystemExit, as ModelRaisedError).
        Past ``give_up_at`` (time.perf_counter(); None: wait for ever) ModelTimeoutError. A
        KeyboardInterrupt of this (the main) thread interrupts the wait."""
        if self._jobs is None:
            self._jobs = self._start()
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        timeout = None
        if give_up_at is not None and np.isfinite(give_up_at):
            timeout = max(0.0, give_up_at - time.perf_counter())
        if not done.wait(timeout):
            self._jobs.put(None)  # that thread ends if the call ever returns
            self._jobs = None
            self.abandoned += 1
            raise ModelTimeoutError("the call did not return")
        ok, value = box[0]
        if ok:
            return value
        if isinstance(value, Exception):
            raise value
        raise ModelRaisedError(describe_exception(value)) from value


# --------------------------------------------------------------------- checks of outputs


def _array(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as the interface asks: a numpy array of ``shape``, float32 or float64."""
    if not isinstance(value, np.ndarray):
        hint = " (convert it: .detach().cpu().numpy())" if type(value).__module__.startswith("torch") else ""
        raise ModelOutputError(
            f"{what} is a {type(value).__module__}.{type(value).__name__}, expected a numpy array "
            f"of shape {shape}{hint}"
        )
    if value.shape != shape:
        raise ModelOutputError(f"{what} has shape {value.shape}, expected {shape}")
    if value.dtype not in FLOAT_DTYPES:
        raise ModelOutputError(f"{what} has dtype {value.dtype}, expected float32 or float64")
    return value


def _not_finite(arr: np.ndarray, what: str) -> ModelOutputError | None:
    """A ModelOutputError naming the first frame (axis 0) with a NaN or infinity, or None."""
    finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1) if arr.size else np.ones(0, bool)
    if finite.all():
        return None
    bad = np.flatnonzero(~finite)
    return ModelOutputError(
        f"{what} is not finite (NaN or infinity) in {len(bad)} of {len(arr)} rows, the first at row {bad[0]}"
    )


def check_transforms(value, n_frames: int, what: str = "the model's transforms") -> np.ndarray:
    """A rigid model's output -> (N-1, 4, 4) float64 T(i->i-1): a numpy array of that
    shape, float32/64, finite, every last row (0, 0, 0, 1) within 1e-6. ModelOutputError
    naming what is wrong otherwise."""
    local = _array(value, what, (n_frames - 1, 4, 4))
    if (err := _not_finite(local, what)) is not None:
        raise err
    off = np.abs(local[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    if (off > LAST_ROW_TOLERANCE).any():
        first = int(np.flatnonzero(off > LAST_ROW_TOLERANCE)[0])
        raise ModelOutputError(
            f"{what}: row {first} has last row {local[first, 3].tolist()}, expected (0, 0, 0, 1) "
            "(homogeneous 4 x 4 transforms)"
        )
    return np.asarray(local, dtype=np.float64)


def check_ddfs(value, n_frames: int, image_size: tuple[int, int], n_landmarks: int) -> DensePrediction:
    """A template model's output -> DensePrediction: a tuple (GP, GL, LP, LL) of numpy
    arrays, GP/LP (N-1, 3, H*W), GL/LL (3, K), float32/64, GL/LL finite. GP/LP are checked
    for NaN frame chunk by frame chunk as they are written (run_scan), not here: a
    full-size check would need a temporary as big as the array."""
    if not isinstance(value, tuple | list) or len(value) != 4:
        got = (
            f"a {type(value).__name__} of {len(value)}"
            if isinstance(value, tuple | list)
            else (f"a {type(value).__name__}")
        )
        raise ModelOutputError(f"the model returned {got}, expected a tuple of 4 arrays (GP, GL, LP, LL)")
    h, w = image_size
    pixels, marks = (n_frames - 1, 3, h * w), (3, n_landmarks)
    GP, GL, LP, LL = (
        _array(v, name, shape)
        for v, name, shape in zip(
            value, ("GP", "GL", "LP", "LL"), (pixels, marks, pixels, marks), strict=True
        )
    )
    for arr, name in ((GL, "GL"), (LL, "LL")):
        if (err := _not_finite(arr.T, name + " (columns: landmarks)")) is not None:
            raise err
    return DensePrediction(GP, GL, LP, LL)


# ------------------------------------------------------------------ a team's model


def _parameters(fn) -> list[str] | None:
    """Names of ``fn``'s positional parameters that have no default and of the rest, or None
    when it has no inspectable signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _required(fn) -> int:
    sig = inspect.signature(fn)
    return sum(
        1
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def function_kind(fn, leading: tuple[str, ...] = ()) -> str | None:
    """'template', 'rigid' or None from ``fn``'s parameter names (after ``leading``, e.g.
    'self'): (frames, landmark, data_path_calib[, device]) or (frames[, device]); any further
    parameter must have a default."""
    names = _parameters(fn)
    if names is None or tuple(names[: len(leading)]) != leading:
        return None
    names = names[len(leading) :]
    required = _required(fn) - len(leading)
    for kind, params in (("template", TEMPLATE_PARAMETERS), ("rigid", RIGID_PARAMETERS)):
        if tuple(names[: len(params)]) == params:
            with_device = names[len(params) : len(params) + 1] == ["device"]
            if required <= len(params) + with_device:
                return kind
    return None


SIGNATURES = (
    "a function predict_ddfs(frames, landmark, data_path_calib, device) -> (GP, GL, LP, LL), "
    "a function transforms(frames, device) -> (N-1, 4, 4), or a class with load(self, device) "
    "and transforms(self, frames) or predict_ddfs(self, frames, landmark, data_path_calib)"
)


def _file_sha256(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TeamModel(Model):
    """A team's model of one of the three kinds (module docstring), as the kit runs it.

    ``source``: the file NAME was found in (its sha256 goes into the fingerprint, with
    SPEC, the kind, the form and the model's optional ``version`` string attribute)."""

    def __init__(self, obj, spec: str, source: Path | None, form: str = DDF_FORM):
        if form not in PREDICTION_FORMS:
            raise ValueError(f"prediction form {form!r}; expected one of {PREDICTION_FORMS}")
        self.obj = obj
        self.spec = spec
        self.source = source
        self.home = source.parent if source is not None else None
        self.is_class = inspect.isclass(obj)
        if self.is_class:
            has = [m for m in ("transforms", "predict_ddfs") if callable(getattr(obj, m, None))]
            if len(has) != 1:
                why = "defines both" if has else "defines neither"
                raise ModelSpecError(
                    f"--model {spec}: class {obj.__name__} {why} transforms(self, frames) and "
                    "predict_ddfs(self, frames, landmark, data_path_calib); it needs exactly one"
                )
            self.method = has[0]
            params = RIGID_PARAMETERS if has[0] == "transforms" else TEMPLATE_PARAMETERS
            expected = ("self", *params)
            names = _parameters(getattr(obj, has[0]))
            if (
                names is None
                or tuple(names[: len(expected)]) != expected
                or _required(getattr(obj, has[0])) > len(expected)
            ):
                raise ModelSpecError(
                    f"--model {spec}: {obj.__name__}.{has[0]} takes ({', '.join(names or ['?'])}), "
                    f"expected ({', '.join(expected)})"
                )
            self.kind = "rigid" if has[0] == "transforms" else "template"
            self._takes_device = False
        elif callable(obj):
            kind = function_kind(obj)
            if kind is None:
                names = _parameters(obj)
                raise ModelSpecError(
                    f"--model {spec}: {getattr(obj, '__name__', 'it')} takes "
                    f"({', '.join(names) if names is not None else '?'}); expected {SIGNATURES}"
                )
            self.kind = kind
            params = TEMPLATE_PARAMETERS if kind == "template" else RIGID_PARAMETERS
            self._takes_device = (_parameters(obj) or [])[len(params) : len(params) + 1] == ["device"]
        else:
            raise ModelSpecError(f"--model {spec}: is a {type(obj).__name__}; expected {SIGNATURES}")
        # A template model returns dense DDFs: they are written as such whatever --format.
        self.form = DDF_FORM if self.kind == "template" else form
        self.name = spec
        self.instance = None
        self.device = None
        self.loads = 0

    @property
    def fingerprint(self) -> str:
        version = getattr(self.obj, "version", "")
        parts = [self.kind, self.spec, _file_sha256(self.source), str(version)[:200], self.form]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def load(self, device) -> None:
        """Instantiate the class (no arguments) and call its load(device), if any: once."""
        self.device = device
        if self.is_class:
            try:
                self.instance = self.obj()
                if callable(getattr(self.instance, "load", None)):
                    self.instance.load(device)
            except BaseException as err:
                why = describe_exception(err, self.home)
                raise ModelSpecError(f"--model {self.spec}: loading it raised {why}") from err
        self.loads += 1

    def _call(self, *args):
        fn = getattr(self.instance, self.method) if self.is_class else self.obj
        if not self.is_class and self._takes_device:
            args = (*args, self.device)
        try:
            return fn(*args)
        except BaseException as err:
            what = describe_exception(err, self.home)
            verb = "called" if isinstance(err, SystemExit) else "raised"
            raise ModelRaisedError(f"the model {verb} {what}") from err

    def predict(self, scan, calib, deadline, landmarks, calib_path) -> RigidPrediction | DensePrediction:
        """Read the scan's frames (N, H, W) uint8, call the model, return what it gave
        (checked by run_scan). Manifest columns: read_s, model_s (the bare call)."""
        t0 = time.perf_counter()
        frames = scan.read_frames()
        t1 = time.perf_counter()
        if self.kind == "rigid":
            out = self._call(frames)
            columns = {"read_s": t1 - t0, "model_s": time.perf_counter() - t1}
            return RigidPrediction(check_transforms(out, len(frames)), columns=columns)
        landmark = np.zeros((0, 3), np.int64) if landmarks is None else np.asarray(landmarks, np.int64)
        out = self._call(frames, landmark, str(calib_path) if calib_path is not None else "")
        columns = {"read_s": t1 - t0, "model_s": time.perf_counter() - t1}
        dense = check_ddfs(out, len(frames), frames.shape[1:], len(landmark))
        dense.columns = columns
        return dense


def _split_spec(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ModelSpecError(
            f"--model {spec}: expected path/to/file.py:NAME or module.name:NAME (NAME a Python name)"
        )
    return where, name


def _import_failed(spec: str, where: str, err: BaseException, home: Path | None = None) -> str:
    return f"--model {spec}: importing {where} raised {describe_exception(err, home)}"


def load_model(spec: str, form: str = DDF_FORM) -> TeamModel:
    """``--model SPEC`` -> TeamModel (not yet loaded onto a device: TeamModel.load).

    A file (``path/to/file.py``) is imported as a module of its own name with its folder
    first on sys.path, so that modules beside it import as they do when it runs there.
    ModelSpecError (one line) for anything that keeps it from being used."""
    where, name = _split_spec(spec)
    path = Path(where)
    if where.endswith(".py") or "/" in where or path.exists():
        if not path.is_file():
            raise ModelSpecError(f"--model {spec}: no file {where}")
        path = path.resolve()
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = f"tusrec_team_model_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except BaseException as err:
            sys.modules.pop(module_name, None)
            raise ModelSpecError(_import_failed(spec, where, err, path.parent)) from err
        source = path
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            if err.name and where.startswith(err.name):
                raise ModelSpecError(f"--model {spec}: no module or file named {where}") from err
            raise ModelSpecError(_import_failed(spec, where, err)) from err
        except BaseException as err:
            raise ModelSpecError(_import_failed(spec, where, err)) from err
        source = Path(module.__file__) if getattr(module, "__file__", None) else None
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))[:8]
        raise ModelSpecError(
            f"--model {spec}: {where} has no {name!r}" + (f" (it has {', '.join(public)})" if public else "")
        )
    return TeamModel(getattr(module, name), spec, source, form)
