"""The one strict read policy for prediction files and manifests (a team wrote them).

Everything a predictions folder holds is hostile input. This module decides, before a
single array element is read, whether the organisers' machine may read a file, and it
turns every attribute and manifest cell into a value or a note, never an exception:

- the file is a regular file, opened with O_NOFOLLOW and read through its own file
  descriptor (no path of the team's is resolved after the check);
- each dataset the format names is reached by a *hard* link of the root group (no soft
  or external link, so nothing outside the file is ever opened), is not virtual, keeps
  its raw data in the file (no external storage), uses only the allowed filters, has
  the format's shape and an accepted float dtype, and has a chunk layout and a chunk
  index whose read cost is bounded (``layout_problem``, ``chunk_index_problem``: chunk
  span and count, chunk shape, the grid's bytes, compression ratios; the file's ratio in
  ``compression_problem``), all before a chunk is decompressed;
- attributes are inspected (type, size, and for a variable-length one the room its heap
  data can take) through h5py's low-level API before they are read, and parsed into
  runtime / model / form with a note when malformed;
- ``max_prediction_bytes``: the largest a valid file can be (the runner's output quota);
- manifest cells (status, seconds, frames, message) of any type parse into a
  ``Declared`` outcome.

The low-level calls (h5l link info, h5d create property lists, H5Dchunk_iter over the
chunk index) never follow a link or touch raw data, so inspecting a file costs metadata
reads only (the index walk stops past the chunk grid's count).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from h5py import h5a, h5d, h5l, h5o, h5t, h5z

from tusrec.data import (
    PREDICTION_LANDMARK_SETS,
    PREDICTION_PER_FRAME_SETS,
    PREDICTION_PIXEL_SETS,
    PREDICTION_TRANSFORM_SETS,
    TusrecDataError,
)
from tusrec.ddf import DEFAULT_CHUNK

OK, FAILED, TIMEOUT, INVALID = "ok", "failed", "timeout", "invalid"
DECLARED_STATUSES = (OK, FAILED, TIMEOUT)

FORM_DENSE, FORM_TRANSFORMS = "ddf", "transforms"
PREDICTION_SETS = (
    *PREDICTION_PIXEL_SETS,
    *PREDICTION_LANDMARK_SETS,
    *PREDICTION_TRANSFORM_SETS,
    *PREDICTION_PER_FRAME_SETS,
)

# Accepted element types of every float dataset: IEEE float32 or float64, either byte
# order. float16 loses millimetres at TUS-REC displacements; integers are not DDFs.
ACCEPTED_DTYPES = "float32 or float64"
# Filters a team may compress with: lossless ones that h5py always ships. Anything else
# (szip, n-bit, scale-offset, or a plugin, which would load code on the host) is refused.
ALLOWED_FILTERS = {
    h5z.FILTER_DEFLATE: "gzip",
    h5z.FILTER_SHUFFLE: "shuffle",
    h5z.FILTER_FLETCHER32: "fletcher32",
    32000: "lzf",
}
# GP/LP chunks: a chunk spans at most MAX_CHUNK_FRAMES frames (the scoring chunk), and
# one frame (3, H*W) is covered by at most MAX_CHUNKS_PER_FRAME chunks, so reading a
# block of frames touches at most ~3x its own size and a bounded number of chunks.
MAX_CHUNK_FRAMES = DEFAULT_CHUNK
MAX_CHUNKS_PER_FRAME = 64
# The small datasets (GL, LL, transforms, uncertainty): at most this many chunks each.
MAX_SMALL_CHUNKS = 4096
# Judging cost, bounded from the chunk index before any chunk is decompressed (a few MB
# of lzf or gzip can otherwise unpack into tens of GB: chunks far larger than the data
# they cover, each decompressed whole for every read that touches it). A chunk may not
# be larger than its dataset along any axis; the chunks of a dataset's grid together
# decompress to at most its own bytes, an eighth more and one layer of chunks along the
# first axis (grid_allowance: the edges of a frame-chunked set); the index holds no chunk
# outside the dataset's shape; and beyond RATIO_SLACK_BYTES, a chunk (and the file's
# compressed datasets together) decompress to at most MAX_COMPRESSION_RATIO times what
# they store. Real float32 DDFs compress 1.1-2x; only near-constant data compresses more
# (an all-zero GP: lzf ~90x, gzip ~1,000x).
GRID_EXCESS = 8  # the grid may exceed a dataset by 1/GRID_EXCESS of it (plus a layer)
MAX_COMPRESSION_RATIO = 100
RATIO_SLACK_BYTES = 1 << 20
MAX_ATTRIBUTE_BYTES = 4096  # runtime_seconds, model, form are scalars or short strings
# A variable-length attribute is read only when the file holds at most this much beyond
# its datasets' raw data (a dense file's metadata: object headers and chunk indexes, about
# 60 B a chunk, so ~0.2 MB at 1,600 frames of one-frame chunks).
MAX_HEAP_BYTES = 8 << 20
MAX_MODEL_CHARS = 200
MAX_MESSAGE_CHARS = 500


class PolicyError(TusrecDataError):
    """A prediction file breaks the read policy (the message says which rule)."""


# --------------------------------------------------------------------------- the file


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` may not be opened (a symlink, fifo, device, folder...), or None.

    Uses lstat, so a link is judged as itself, never by what it points to.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path}: file not found"
    except OSError as err:
        return f"{path}: cannot be examined ({err.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path}: is a symbolic link, not a regular file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: is not a regular file ({_file_kind(st.st_mode)})"
    return None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "of an unknown kind"


def open_regular(path: Path) -> io.FileIO:
    """Open a regular file for reading without following a link at its last component.

    O_NONBLOCK keeps a fifo swapped in after the lstat from blocking the open; fstat then
    checks the object actually opened. Raises PolicyError.
    """
    problem = regular_file_problem(path)
    if problem:
        raise PolicyError(problem)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise PolicyError(f"{path}: cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PolicyError(f"{path}: is not a regular file")
    return io.FileIO(fd, "rb", closefd=True)


@contextlib.contextmanager
def open_prediction(path: str | Path, chunk_cache_bytes: int = 0) -> Iterator[h5py.File]:
    """An HDF5 prediction file opened under the policy: through its own descriptor.

    h5py reads through the file object (driver 'fileobj'), so HDF5 never opens a path
    itself. chunk_cache_bytes: size of the raw-data chunk cache (0: HDF5's default).
    Raises PolicyError (not a regular file, not HDF5).
    """
    path = Path(path)
    raw = open_regular(path)
    try:
        kwargs = {"rdcc_nbytes": int(chunk_cache_bytes)} if chunk_cache_bytes else {}
        try:
            f = h5py.File(raw, "r", locking=False, **kwargs)
        except Exception as err:  # h5py raises OSError, ValueError, ... for a non-HDF5 file
            raise PolicyError(f"{path}: cannot be opened as an HDF5 file ({err})") from None
        f._policy_name = str(path)  # messages name the path, not the file object
        f._policy_fd = raw.fileno()  # the descriptor HDF5 reads through (read-ahead hints)
        try:
            yield f
        finally:
            f.close()
    finally:
        raw.close()


# --------------------------------------------------------------------------- datasets


def link_kind(f: h5py.File, name: str) -> str | None:
    """'hard', 'soft', 'external' or 'user-defined' for the root link ``name`` (None if
    absent), read from the link itself: H5Lexists and H5Lget_info never traverse it."""
    key = name.encode()
    if not f.id.links.exists(key):
        return None
    kind = f.id.links.get_info(key).type
    return {h5l.TYPE_HARD: "hard", h5l.TYPE_SOFT: "soft", h5l.TYPE_EXTERNAL: "external"}.get(
        kind, "user-defined"
    )


def open_dataset(f: h5py.File, name: str, shape: tuple, expected: str | None = None) -> h5py.Dataset:
    """The dataset ``name`` after every policy check, ready to read; raises PolicyError.

    shape: the format's shape. expected: how to describe the dataset when it is absent.
    """
    where = f"{_filename(f)}: '{name}'"
    kind = link_kind(f, name)
    if kind is None:
        raise PolicyError(
            f"{_filename(f)}: no dataset '{name}' (expected {expected or f'{ACCEPTED_DTYPES} {shape}'})"
        )
    if kind == "soft":
        raise PolicyError(f"{where} is a soft link; datasets must be stored in the file itself")
    if kind == "external":
        target = f.id.links.get_val(name.encode())
        raise PolicyError(
            f"{where} is an external link (to {_show(target)}); datasets must be stored in the file itself"
        )
    if kind != "hard":
        raise PolicyError(f"{where} is a user-defined link; datasets must be stored in the file itself")
    info = h5o.get_info(f.id, name.encode())
    if info.type != h5o.TYPE_DATASET:
        raise PolicyError(f"{_filename(f)}: no dataset '{name}' ('{name}' is not a dataset)")
    dsid = h5d.open(f.id, name.encode())
    problems = dataset_problems(dsid, shape)
    if problems:
        raise PolicyError(f"{where} " + "; ".join(problems))
    return h5py.Dataset(dsid)


def _filename(f: h5py.File) -> str:
    name = getattr(f, "_policy_name", None)
    return name if name else str(f.filename)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def dataset_problems(dsid: h5d.DatasetID, shape: tuple) -> list[str]:
    """What is wrong with an open dataset: storage first (it decides whether anything
    may be read), then type and shape, then the chunk layout. Empty when it passes."""
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5d.VIRTUAL:
        return ["is a virtual dataset; datasets must be stored in the file itself"]
    if dcpl.get_external_count() > 0:
        names = [_show(dcpl.get_external(i)[0]) for i in range(min(dcpl.get_external_count(), 3))]
        return [
            f"keeps its data in external file(s) {', '.join(names)}; data must be stored in the file itself"
        ]
    if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED, h5d.COMPACT):
        return [f"has an unknown storage layout ({layout})"]
    for i in range(dcpl.get_nfilters()):
        code, _flags, _values, fname = dcpl.get_filter(i)
        if code not in ALLOWED_FILTERS:
            label = fname.decode(errors="replace") if isinstance(fname, bytes) else str(fname)
            allowed = ", ".join(ALLOWED_FILTERS.values())
            return [f"uses filter {code} ({label or 'unnamed'}); allowed filters: {allowed}"]
    out = []
    tid = dsid.get_type()
    if tid.get_class() != h5t.FLOAT or tid.get_size() not in (4, 8):
        out.append(f"has dtype {_dtype_name(dsid)}, expected {ACCEPTED_DTYPES}")
    got = tuple(int(s) for s in dsid.shape) if dsid.shape is not None else None
    if got != tuple(shape):
        out.append(f"has shape {got}, expected {tuple(shape)}")
    if out:
        return out
    if layout == h5d.CHUNKED:
        chunks = tuple(int(c) for c in dcpl.get_chunk())
        problem = layout_problem(chunks, tuple(shape)) or chunk_index_problem(
            dsid, chunks, tuple(shape), dcpl.get_nfilters() > 0
        )
        if problem:
            return [problem]
    return []


def _dtype_name(dsid: h5d.DatasetID) -> str:
    try:
        return str(dsid.dtype)
    except Exception:  # a type numpy cannot represent
        return "of an unsupported HDF5 type"


def layout_problem(chunks: tuple, shape: tuple) -> str | None:
    """Why a chunk layout costs too much to read, or None (see the module constants).

    A pixel set (N-1, 3, H*W) is read a block of frames at a time: its chunks span at
    most MAX_CHUNK_FRAMES frames and at most MAX_CHUNKS_PER_FRAME chunks cover a frame.
    Any other dataset has at most MAX_SMALL_CHUNKS chunks.
    """
    counts = [math.ceil(s / c) if c else math.inf for s, c in zip(shape, chunks, strict=False)]
    if len(shape) == 3 and shape[1] == 3 and len(chunks) == 3:
        if chunks[0] > MAX_CHUNK_FRAMES:
            return (
                f"has chunks {chunks} spanning {chunks[0]} frames; a chunk may span at most "
                f"{MAX_CHUNK_FRAMES} frames"
            )
        per_frame = counts[1] * counts[2]
        if per_frame > MAX_CHUNKS_PER_FRAME:
            return (
                f"has chunks {chunks}: {per_frame} chunks per frame; at most {MAX_CHUNKS_PER_FRAME} "
                "chunks may cover a frame"
            )
        return None
    total = math.prod(counts)
    if total > MAX_SMALL_CHUNKS:
        return f"has chunks {chunks}: {total} chunks; at most {MAX_SMALL_CHUNKS} are allowed"
    return None


# What a valid file may hold beyond its datasets' chunk grids (max_prediction_bytes): an
# entry in a chunk index (h5py's v1 B-tree: 56-61 B a chunk, measured), what a filter may
# add to a chunk it cannot shrink (deflate: 5 B a 64 KiB block and 6 B; fletcher32: 4 B),
# and the rest of the file: superblock, object headers, attributes.
CHUNK_INDEX_BYTES = 128
FILTER_GROWTH = 1000  # a filtered chunk stores at most 1/FILTER_GROWTH more, plus 16 B
METADATA_BYTES = 256 << 10


def max_prediction_bytes(n_frames: int, height: int, width: int, n_landmarks: int | None) -> int:
    """The largest a valid prediction file of one scan can be under the format, in bytes.

    n_frames N, height H, width W: the scan's; n_landmarks K (0 or None: none). Every
    dataset the format names present (GP, LP (N-1, 3, H*W); GL, LL (3, K); both transform
    sets (N-1, 4, 4); every per-frame set (N-1,)), all float64 (the widest dtype allowed),
    each chunked as wastefully as the read policy accepts (grid_allowance, the most chunks
    layout_problem accepts, each with its index entry and filter growth), plus
    METADATA_BYTES. The runner's output quota (tusrec.harness.runner.output_quota) is this.
    """
    n, hw = n_frames - 1, height * width
    sets = [((n, 3, hw), MAX_CHUNK_FRAMES, n * min(MAX_CHUNKS_PER_FRAME, 3 * hw))] * len(
        PREDICTION_PIXEL_SETS
    )
    small = [(3, n_landmarks)] * len(PREDICTION_LANDMARK_SETS) if n_landmarks else []
    small += [(n, 4, 4)] * len(PREDICTION_TRANSFORM_SETS) + [(n,)] * len(PREDICTION_PER_FRAME_SETS)
    sets += [(shape, shape[0], min(MAX_SMALL_CHUNKS, math.prod(shape))) for shape in small]
    total = METADATA_BYTES
    for shape, span, chunks in sets:
        worst = max(range(1, min(span, shape[0]) + 1), key=lambda c: -shape[0] % c)  # most rows past
        grid = grid_allowance(shape, 8, worst)
        total += grid + grid // FILTER_GROWTH + chunks * (CHUNK_INDEX_BYTES + 16)
    return total


def grid_allowance(shape: tuple, itemsize: int, span: int) -> int:
    """Most bytes the chunk grid of a dataset may decompress to: its own bytes, 1/GRID_EXCESS
    more, the rows its last layer of ``span``-row chunks reaches past the first axis (a
    frame-chunked set whose frames are not a multiple of the span), and RATIO_SLACK_BYTES
    (so a small dataset may be chunked any way). shape: the dataset's; itemsize: bytes."""
    own = math.prod(shape) * itemsize
    past = (-shape[0] % span) * math.prod(shape[1:]) * itemsize if shape else 0
    return own + own // GRID_EXCESS + past + RATIO_SLACK_BYTES


def chunk_index_problem(dsid: h5d.DatasetID, chunks: tuple, shape: tuple, filtered: bool) -> str | None:
    """Why reading a chunked dataset would decompress too much, from its chunk shape and
    its chunk index (each chunk's offset and stored size), or None. Nothing is
    decompressed: H5Dchunk_iter reads the index only, and stops past the grid's count.

    chunks, shape: the dataset's chunk shape and shape. filtered: it has filters (an
    unfiltered chunk stores its own bytes: no ratio to bound).
    """
    for axis, (c, s) in enumerate(zip(chunks, shape, strict=True)):
        if c > max(s, 1):
            return (
                f"has chunks {chunks} larger than its shape {shape} along axis {axis}; "
                "a chunk may not exceed the dataset"
            )
    itemsize = dsid.get_type().get_size()
    chunk_bytes = math.prod(chunks) * itemsize
    grid = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))
    allowed = grid_allowance(shape, itemsize, chunks[0] if chunks else 1)
    if grid * chunk_bytes > allowed:
        return (
            f"has chunks {chunks} whose grid decompresses to {grid * chunk_bytes} bytes for the "
            f"dataset's {math.prod(shape) * itemsize}; at most {allowed} (the dataset's bytes, "
            f"1/{GRID_EXCESS} more and one layer of chunks)"
        )
    if not filtered:
        return None
    found: list[str] = []
    count = 0

    def visit(info):
        nonlocal count
        count += 1
        if count > grid:
            found.append(f"has more than {grid} chunks in its index (its chunk grid holds {grid})")
        elif any(o >= max(s, 1) for o, s in zip(info.chunk_offset, shape, strict=True)):
            found.append(f"holds a chunk at {tuple(info.chunk_offset)}, outside its shape {shape}")
        else:
            # The data a chunk holds: an edge chunk's fill past the shape compresses to
            # nothing, and its cost is the grid's (bounded above), not the ratio's.
            held = itemsize * math.prod(
                min(c, s - o) for c, s, o in zip(chunks, shape, info.chunk_offset, strict=True)
            )
            if held > MAX_COMPRESSION_RATIO * info.size + RATIO_SLACK_BYTES:
                found.append(
                    f"has a chunk at {tuple(info.chunk_offset)} of {info.size} bytes holding {held} "
                    f"(ratio {held / max(info.size, 1):.0f}); the compression ratio of a chunk may be "
                    f"at most {MAX_COMPRESSION_RATIO}"
                )
        return True if found else None  # anything but None stops the iteration

    try:
        dsid.chunk_iter(visit)
    except Exception as err:  # a corrupt index: nothing may be read
        return f"has an unreadable chunk index ({type(err).__name__}: {clean_text(str(err), 200)})"
    return found[0] if found else None


def compression_problem(f: h5py.File, names) -> str | None:
    """Why the compressed datasets ``names`` of a file, together, hold too much data for
    what they store, or None (the per-file bound: many chunks each under the per-chunk
    slack add up). Only root datasets that exist and are filtered count."""
    unpacked = stored = 0
    for name in names:
        if link_kind(f, name) != "hard":
            continue
        dsid = h5d.open(f.id, name.encode())
        if dsid.get_create_plist().get_nfilters() == 0:
            continue
        unpacked += math.prod(int(n) for n in dsid.shape) * dsid.get_type().get_size()
        stored += dsid.get_storage_size()
    if unpacked > MAX_COMPRESSION_RATIO * stored + RATIO_SLACK_BYTES:
        return (
            f"{_filename(f)}: its compressed datasets store {stored} bytes holding {unpacked} "
            f"(ratio {unpacked / max(stored, 1):.0f}); the compression ratio of a file may be at most "
            f"{MAX_COMPRESSION_RATIO}"
        )
    return None


# --------------------------------------------------------------------------- attributes


@dataclass
class FileAttributes:
    """The attributes of a prediction file, parsed: runtime (s, NaN if unknown), model,
    form ('ddf', 'transforms', None if absent, or the raw text if unrecognised) and notes."""

    runtime_seconds: float = math.nan
    model: str = ""
    form: str | None = None
    notes: list[str] = field(default_factory=list)


def read_attribute(f: h5py.File, name: str):
    """(value, problem): a small scalar attribute of the root group, inspected with h5a
    (shape, type, size) before it is read. value is None when absent or refused.

    A fixed-size attribute's size is its storage size. A variable-length one (a string
    or anything holding a sequence) stores only a 16-byte reference there; its data lives
    in the file's global heap, which can hold at most what the file holds beyond the
    format's datasets (variable_length_room): past MAX_HEAP_BYTES of that it is not read.
    """
    key = name.encode()
    try:
        if not h5a.exists(f.id, key):
            return None, None
        aid = h5a.open(f.id, key)
        size = aid.get_storage_size()
        if size > MAX_ATTRIBUTE_BYTES:
            return None, f"attribute '{name}' is {size} bytes (at most {MAX_ATTRIBUTE_BYTES})"
        if aid.shape not in ((), (1,)):
            return None, f"attribute '{name}' has shape {aid.shape}; expected a single value"
        tid = aid.get_type()
        variable = tid.detect_class(h5t.VLEN) or (tid.get_class() == h5t.STRING and tid.is_variable_str())
        if variable:
            room = variable_length_room(f)
            if room > MAX_HEAP_BYTES:
                return None, (
                    f"attribute '{name}' is variable-length and the file holds {room} bytes beyond its "
                    f"datasets (at most {MAX_HEAP_BYTES} for a variable-length attribute to be read)"
                )
        value = f.attrs[name]
    except Exception as err:  # any HDF5 or type error: the attribute is unreadable
        return None, f"attribute '{name}' unreadable ({type(err).__name__}: {err})"
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    text = as_text(value)
    if text is not None and len(text) > MAX_ATTRIBUTE_BYTES:
        return None, f"attribute '{name}' is {len(text)} characters (at most {MAX_ATTRIBUTE_BYTES})"
    return value, None


def variable_length_room(f: h5py.File) -> int:
    """Bytes the file holds beyond the raw data of the format's root datasets: an upper
    bound on any variable-length attribute's data (with the metadata). Metadata only."""
    fd = getattr(f, "_policy_fd", None)
    size = os.fstat(fd).st_size if fd is not None else f.id.get_filesize()
    for name in PREDICTION_SETS:
        if link_kind(f, name) == "hard" and h5o.get_info(f.id, name.encode()).type == h5o.TYPE_DATASET:
            size -= h5d.open(f.id, name.encode()).get_storage_size()
    return max(size, 0)


def as_text(value) -> str | None:
    """An attribute's value as text (bytes decoded, invalid UTF-8 replaced); None when it
    is not a string."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str | np.str_):
        return str(value)
    return None


def read_attributes(f: h5py.File) -> FileAttributes:
    """runtime_seconds, model and form of a prediction file; never raises."""
    out = FileAttributes()
    value, problem = read_attribute(f, "runtime_seconds")
    if problem:
        out.notes.append(f"runtime unknown: {problem}")
    elif value is not None:
        seconds = parse_seconds(value)
        if seconds is None:
            out.notes.append(
                f"runtime unknown: attribute runtime_seconds={_show(value)} is not a number of seconds"
            )
        else:
            out.runtime_seconds = seconds
    value, problem = read_attribute(f, "model")
    if problem:
        out.notes.append(problem)
    elif value is not None:
        text = as_text(value)
        out.model = clean_text(text if text is not None else str(value), MAX_MODEL_CHARS)
    value, problem = read_attribute(f, "form")
    if problem:
        out.form = "unreadable"
        out.notes.append(problem)
    elif value is not None:
        text = as_text(value)
        out.form = clean_text(text, 40) if text is not None else f"not a string ({type(value).__name__})"
    return out


# --------------------------------------------------------------------------- manifest cells


def clean_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Printable, single-line, at most ``limit`` characters (a team's message goes into
    the organisers' tables and terminals)."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _missing(value) -> bool:
    """An empty cell: None, NaN, pandas' NA or blank text."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        missing = pd.isna(value)
    except (TypeError, ValueError):
        return False
    return bool(missing) if isinstance(missing, bool | np.bool_) else False


def _scalar(value):
    """A one-element array as its element; other arrays stay arrays (and are refused)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(-1)[0]
    return value


def parse_seconds(value) -> float | None:
    """A finite, non-negative number of seconds from a number or numeric text; None if
    malformed (bools, text like 'fast', NaN, inf, negative, arrays)."""
    value = _scalar(value)
    if isinstance(value, bool | np.bool_ | np.ndarray):
        return None
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8", errors="replace")
    try:
        seconds = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def parse_frames(value) -> int | None:
    """A positive whole number of frames (int, integral float or digits), else None."""
    value = _scalar(value)
    if isinstance(value, bool | np.bool_ | np.ndarray):
        return None
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number != int(number) or number < 1:
        return None
    return int(number)


@dataclass
class Declared:
    """What the manifest (or the runner) says about one scan, parsed.

    status: 'ok', 'failed', 'timeout', None (no row / no status) or 'invalid' when the
    cell is malformed (problem says why). seconds: NaN if absent or malformed. frames:
    None if absent or malformed. notes: malformed cells that do not decide the status.
    """

    status: str | None = None
    seconds: float = math.nan
    frames: int | None = None
    message: str = ""
    problem: str = ""
    notes: list[str] = field(default_factory=list)
    frames_given: bool = False


def _cell(row, name: str):
    try:
        if row is None:
            return None
        if hasattr(row, "get"):
            return row.get(name, None)
        return None
    except Exception:
        return None


def parse_declared(row) -> Declared:
    """A Declared from a manifest row (pandas Series or dict, any cell types) or None."""
    out = Declared()
    if row is None:
        return out
    status = _cell(row, "status")
    if not _missing(status):
        text = as_text(status)
        text = text.strip().lower() if text is not None else None
        if text in DECLARED_STATUSES:
            out.status = text
        else:
            out.status = INVALID
            out.problem = (
                f"manifest status {_show(clean_text(str(status), 60))}; expected ok, failed or timeout"
            )
    seconds = _cell(row, "seconds")
    if not _missing(seconds):
        parsed = parse_seconds(seconds)
        if parsed is None:
            out.notes.append(
                f"runtime unknown: manifest seconds={_show(clean_text(str(seconds), 60))} is not a number"
            )
        else:
            out.seconds = parsed
    frames = _cell(row, "frames")
    if not _missing(frames):
        out.frames_given = True
        out.frames = parse_frames(frames)
    message = _cell(row, "message")
    if not _missing(message):
        out.message = clean_text(str(message))
    return out
