"""Read-ahead of a dense prediction's frames: the kernel reads the next frames from the
disk while the scorer computes on the current ones.

The scorer reads a dense GP/LP a block of frames at a time through h5py, which holds its
global lock for the whole read, and the comparison of a block needs the block: from a
cold page cache, reading and computing would take turns. ``ReadAhead`` tells the kernel
(``posix_fadvise(POSIX_FADV_WILLNEED)``) which byte ranges of the file the next frames
occupy, a window of ``window_bytes`` ahead of the reader; the kernel reads them into the
page cache asynchronously, without the GIL or h5py's lock, and h5py's own read of them
is then a copy from memory. It is only a hint: what is read and scored is unchanged, bit
for bit, and a range that is wrong, or past the end of the file, costs nothing but the
hint (the kernel clips it to the file).

Byte ranges come from the dataset's own storage index: ``get_offset`` for contiguous
data, ``get_chunk_info_by_coord`` for each chunk for chunked data (its stored, possibly
filtered, bytes). The policy bounds the chunks a frame may have (at most 64 per frame,
at most 16 frames a chunk), so a window costs a bounded number of index look-ups.
Compact datasets live in the file's header: nothing to ask for.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from pathlib import Path

import h5py
from h5py import h5d

WINDOW_BYTES = 256 << 20  # per dataset: ~70 frames of a 480 x 640 float32 GP ahead of the reader
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # Linux and most Unixes; absent on macOS


def frame_byte_ranges(ds: h5py.Dataset, start: int, stop: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges in the file holding frames start..stop-1 of a pixel
    dataset (N-1, 3, P), merged where adjacent, in file order; [] for compact or
    unallocated storage."""
    dsid = ds.id
    layout = dsid.get_create_plist().get_layout()
    ranges = []
    if layout == h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        if offset is None:
            return []
        frame_bytes = math.prod(ds.shape[1:]) * ds.dtype.itemsize
        ranges.append((offset + start * frame_bytes, (stop - start) * frame_bytes))
    elif layout == h5d.CHUNKED:
        c0, c1, c2 = ds.chunks
        for f0 in range(start // c0 * c0, stop, c0):
            for j in range(0, ds.shape[1], c1):
                for k in range(0, ds.shape[2], c2):
                    info = dsid.get_chunk_info_by_coord((f0, j, k))
                    if info.byte_offset is not None and info.size:
                        ranges.append((int(info.byte_offset), int(info.size)))
    ranges.sort()
    merged: list[list[int]] = []
    for offset, length in ranges:
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length - merged[-1][0])
        else:
            merged.append([offset, length])
    return [(o, n) for o, n in merged]


def hint_piece_bytes(fd: int) -> int:
    """The most one WILLNEED hint makes the kernel read: its read-ahead size for the
    file's device (``/sys/class/bdi/MAJ:MIN/read_ahead_kb``; since Linux 5.x a larger
    hint reads only that much), else 128 KiB (the kernel's default, a safe lower bound)."""
    try:
        dev = os.fstat(fd).st_dev
        text = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        return max(4096, int(text) * 1024)
    except (OSError, ValueError):
        return 128 << 10


class ReadAhead:
    """``prefetch(ds, start, stop)``: the reader is about to read frames start..stop-1 of
    ``ds``; ask the kernel for those and for the frames of the next ``window_bytes``
    (each frame asked for once). fd: the descriptor the file was opened on (the read
    policy's own). The hints are given by a thread of its own, in pieces the kernel reads
    whole (``hint_piece_bytes``): a hint blocks while the disk's queue is full, which
    must not stall the scorer. Safe to call from the threads that score GP and LP side by
    side (one queue, in the order asked). ``close()`` (or ``with``) stops the thread."""

    def __init__(self, fd: int, window_bytes: int = WINDOW_BYTES, piece_bytes: int | None = None):
        self.fd = fd
        self.window_bytes = window_bytes
        self.piece_bytes = piece_bytes or hint_piece_bytes(fd)
        self._asked: dict[str, int] = {}  # dataset name -> frames asked for so far
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.enabled = _WILLNEED is not None

    def __call__(self, ds: h5py.Dataset, start: int, stop: int) -> None:
        if not self.enabled:
            return
        n = ds.shape[0]
        frame_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
        ahead = max(stop - start, self.window_bytes // frame_bytes)
        end = min(n, stop + ahead)
        with self._lock:
            begin = max(start, self._asked.get(ds.name, 0))
            if begin >= end:
                return
            self._asked[ds.name] = end
            if self._thread is None:
                self._thread = threading.Thread(target=self._hint, name="readahead", daemon=True)
                self._thread.start()
        try:
            ranges = frame_byte_ranges(ds, begin, end)
        except Exception:  # an index h5py cannot walk: the read itself will say what is wrong
            self.enabled = False
            return
        self._queue.put(ranges)

    def _hint(self) -> None:
        while (ranges := self._queue.get()) is not None:
            for offset, length in ranges:
                for piece in range(offset, offset + length, self.piece_bytes):
                    if not self.enabled:
                        break
                    try:
                        n = min(self.piece_bytes, offset + length - piece)
                        os.posix_fadvise(self.fd, piece, n, _WILLNEED)
                    except OSError:  # a hint the kernel refuses: nothing is lost
                        self.enabled = False

    def close(self, drop: bool = True) -> None:
        """Stop the hinting thread and wait for it; hints not given yet are dropped (the
        scorer is done), or with ``drop=False`` given first."""
        if self._thread is not None:
            if drop:
                self.enabled = False
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
