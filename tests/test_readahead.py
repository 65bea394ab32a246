"""Read-ahead of dense predictions (tusrec.scoring.readahead): the byte ranges it asks the
kernel for are those of the frames (checked against the bytes themselves), each frame is
asked for once and ahead of the reader, and scores are the same, bit for bit, with it,
without it, and when the kernel refuses the hint."""

import os
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from tusrec.data import open_data
from tusrec.ddf import GroundTruth, pixel_ddfs
from tusrec.scoring import readahead
from tusrec.scoring.readahead import ReadAhead, frame_byte_ranges
from tusrec.scoring.score import score_prediction_file

N, P = 12, 3 * 40  # frames, pixels: (12, 3, 120) float32, 1,440 bytes a frame


@pytest.fixture
def arrays(tmp_path):
    """One file holding a pixel set in each layout the policy allows, the data written in
    frame order (as any writer does)."""
    data = np.random.default_rng(0).normal(0, 10, (N, 3, P)).astype(np.float32)
    path = tmp_path / "layouts.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("contiguous", data=data)
        f.create_dataset("one_frame_chunks", data=data, chunks=(1, 3, P))
        f.create_dataset("four_frame_chunks", data=data, chunks=(4, 3, P))
        f.create_dataset("split_frames", data=data, chunks=(2, 1, P // 2))
        f.create_dataset("gzip", data=data, chunks=(2, 3, P), compression="gzip")
    return path, data


def _pread(path, ranges) -> bytes:
    with open(path, "rb") as f:
        return b"".join(os.pread(f.fileno(), n, o) for o, n in ranges)


@pytest.mark.parametrize("name", ["contiguous", "one_frame_chunks", "four_frame_chunks"])
def test_ranges_hold_exactly_the_frames_bytes(arrays, name):
    path, data = arrays
    with h5py.File(path, "r") as f:
        ds = f[name]
        for start, stop in [(0, N), (3, 7), (5, 6)]:
            ranges = frame_byte_ranges(ds, start, stop)
            got = _pread(path, ranges)
            if name == "four_frame_chunks":  # whole chunks: frames 4 * (start // 4) onwards
                first, last = start // 4 * 4, min(N, -(-stop // 4) * 4)
                assert got == data[first:last].tobytes()
            else:
                assert got == data[start:stop].tobytes()
                assert len(ranges) == 1  # adjacent frames are one range


def test_ranges_of_frames_split_in_chunks_cover_every_chunk(arrays):
    path, data = arrays
    with h5py.File(path, "r") as f:
        ds = f["split_frames"]
        ranges = frame_byte_ranges(ds, 2, 4)  # chunks (2, 1, 60): 6 chunks hold frames 2, 3
        chunk_bytes = 2 * 1 * (P // 2) * 4
        assert sum(n for _, n in ranges) == 6 * chunk_bytes
        raw = _pread(path, ranges)
        pieces = {raw[i : i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)}
        expected = {
            np.ascontiguousarray(data[2:4, c : c + 1, p : p + P // 2]).tobytes()
            for c in range(3)
            for p in (0, P // 2)
        }
        assert pieces == expected


def test_ranges_of_compressed_chunks_are_their_stored_bytes(arrays):
    path, data = arrays
    with h5py.File(path, "r") as f:
        ds = f["gzip"]
        infos = [ds.id.get_chunk_info_by_coord((s, 0, 0)) for s in (2, 4)]
        ranges = frame_byte_ranges(ds, 3, 6)  # chunks of frames 2-3 and 4-5
    assert sum(n for _, n in ranges) == sum(i.size for i in infos)
    for info, start in zip(infos, (2, 4), strict=True):
        stored = _pread(path, [(info.byte_offset, info.size)])
        assert zlib.decompress(stored) == data[start : start + 2].tobytes()


def _union(asked) -> list[tuple[int, int]]:
    """The byte intervals [a, b) that the hints cover, merged."""
    out: list[list[int]] = []
    for o, n in sorted(asked):
        if out and o <= out[-1][1]:
            out[-1][1] = max(out[-1][1], o + n)
        else:
            out.append([o, o + n])
    return [tuple(x) for x in out]


def test_each_frame_is_asked_for_once_ahead_of_the_reader_in_pieces(arrays, monkeypatch):
    path, _ = arrays
    asked = []

    def record(fd, offset, length, advice):
        assert (fd, advice) == (99, os.POSIX_FADV_WILLNEED)
        asked.append((offset, length))

    monkeypatch.setattr(os, "posix_fadvise", record)
    frame = 3 * P * 4
    piece = 1000  # not a divisor of a frame: pieces cross frame boundaries
    with h5py.File(path, "r") as f:
        ds = f["contiguous"]
        base = ds.id.get_offset()
        ahead = ReadAhead(fd=99, window_bytes=4 * frame, piece_bytes=piece)
        ahead(ds, 0, 2)  # the reader is at frames 0-1: 0-1 and the 4 frames after
        ahead(ds, 2, 4)  # 2-5 asked already; 6-7 are new
        ahead(ds, 2, 4)  # nothing new
        ahead.close(drop=False)  # the hinting thread gives what it was asked, then stops
        assert _union(asked) == [(base, base + 8 * frame)]
        assert max(n for _, n in asked) == piece
        ahead = ReadAhead(fd=99, window_bytes=4 * frame, piece_bytes=piece)
        asked.clear()
        for s in range(0, N, 2):
            ahead(ds, s, s + 2)
        ahead.close(drop=False)
    assert _union(asked) == [(base, base + N * frame)]  # every frame, none past the end
    assert sum(n for _, n in asked) == N * frame  # each byte once


def test_hint_pieces_are_the_kernels_read_ahead_size(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        dev = os.fstat(f.fileno()).st_dev
        sysfs = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        expected = int(Path(sysfs).read_text()) * 1024 if os.path.exists(sysfs) else 128 << 10
        assert readahead.hint_piece_bytes(f.fileno()) == expected


def _dense_prediction(data, tmp_path, layout):
    """A noisy prediction of the first scan, GP and LP stored with ``layout``'s chunks."""
    scan = data.scans[0]
    gt = GroundTruth.from_scan(scan, data.calibration)
    _, h, w = scan.shape
    rng = np.random.default_rng(3)
    path = tmp_path / f"{layout}.h5"
    with h5py.File(path, "w") as f:
        for name, true in (("GP", gt.global_), ("LP", gt.local)):
            field = pixel_ddfs(true, data.calibration.T_scale, h, w)
            noisy = field + rng.normal(0, 0.5, field.shape).astype(np.float32)
            chunks = {"contiguous": None, "frames": (1, 3, h * w), "gzip": (2, 3, h * w)}[layout]
            f.create_dataset(
                name, data=noisy, chunks=chunks, compression="gzip" if layout == "gzip" else None
            )
        lm = scan.read_landmarks()
        f["GL"] = rng.normal(0, 1, (3, len(lm))).astype(np.float32)
        f["LL"] = rng.normal(0, 1, (3, len(lm))).astype(np.float32)
    return scan, gt, path


@pytest.mark.parametrize("layout", ["contiguous", "frames", "gzip"])
def test_scores_are_the_same_bit_for_bit_with_and_without_read_ahead(
    dataset_factory, tmp_path, layout, monkeypatch
):
    root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP",), 9, landmark_dir="landmark")
    data = open_data(root)
    scan, gt, path = _dense_prediction(data, tmp_path, layout)
    lm = scan.read_landmarks()
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: calls.append(a) or real(*a))
    # A tiny file is scored before the hinting thread has started: let it finish its hints.
    close = ReadAhead.close
    monkeypatch.setattr(ReadAhead, "close", lambda self, drop=True: close(self, drop=False))
    with_hints = score_prediction_file(path, scan.shape, gt, lm, chunk=2, readahead_bytes=1 << 20)
    assert calls  # the hints were given
    calls.clear()
    without = score_prediction_file(path, scan.shape, gt, lm, chunk=2, readahead_bytes=0)
    assert not calls

    def refuse(*a):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    refused = score_prediction_file(path, scan.shape, gt, lm, chunk=2)
    for name in ("GPE", "LPE", "GLE", "LLE", "GPE_identity", "LPE_identity"):
        assert with_hints[name] == without[name] == refused[name], name
        assert with_hints[name] > 0
    assert readahead._WILLNEED is not None  # Linux: the hint exists where this is tested
