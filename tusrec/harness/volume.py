"""Where a team's container writes, and what the runner keeps of it.

**The quota is the kernel's.** A team's ``/output`` is its own ext4 filesystem in a file
(``OUT/.volumes/<unit>.img``, loop-mounted ``nosuid,nodev,noexec`` at the unit's work
folder). The file's blocks are reserved with ``fallocate`` before the container starts, so

- the team can never write more than its quota, whatever it does (a file unlinked while
  open, names the host cannot walk, sparse files: the filesystem is full, ``ENOSPC``);
- it can never take the space of another team's unit running beside it, nor of the
  runner's own logs and tables: its space was taken from the disk before it ran, and a
  disk without room for it is the run's fault, said before the container starts
  (``InfrastructureError``), never the team's verdict;
- the filesystem's inode count bounds the number of files it can make.

Making the filesystem needs root on the host (``mount``); without it, or without
``mkfs.ext4``/``losetup``, the runner falls back to watching a plain folder (the walk of
``tusrec.harness.runner.output_usage``), which bounds the disk only between two polls; the
run says so once at its start.

**What is kept is a copy made by the runner.** A prediction kept with
``--keep-predictions`` is never moved: its bytes are copied, through a descriptor that
follows no link and blocks on no fifo, into a new file that the runner creates itself, so
it is owned by the runner's user with mode 0644, and it is checked again after it is
renamed into place (a regular file, that owner, that mode, no setuid/setgid/sticky bit).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEPT_MODE = 0o644
MKFS_BYTES = 24 * 2**20  # ext4's own structures beside the data (measured: at most 23 MB up to 60 GB)
VOLUME_INODES = 4096  # files and folders a team's filesystem can hold (the walk allows 1,000)
FS_BLOCK = 4096


class InfrastructureError(RuntimeError):
    """The host, not the team, failed a unit: no disk for its output, no loop device, the
    engine refused to start a container. Never cached as the team's verdict: the unit is
    tried again, and reported as not done when it still fails."""


def remove_tree(path: Path) -> None:
    """Delete a folder a team wrote into, whatever it holds (any depth, odd names, no
    write bits). shutil.rmtree never follows links; coreutils' rm takes what is left
    (Python 3.11's rmtree recurses and stops at a deep enough tree)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except Exception:  # OSError, or RecursionError on a deep tree: rm takes what is left
        subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], check=False)


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise InfrastructureError(f"{args[0]} failed ({result.returncode}): {why[-1] if why else ''}")


def kernel_quota_problem() -> str:
    """'' when this host can give each unit a filesystem of its own (root, ``mount``,
    ``mkfs.ext4``, ``losetup``), else why not."""
    if os.geteuid() != 0:
        return "the runner is not root, so it cannot mount a filesystem per container"
    missing = [tool for tool in ("mount", "umount", "mkfs.ext4", "losetup") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return ""


def volume_image_bytes(quota: int) -> int:
    """Size of the file that holds a filesystem with at least ``quota`` bytes free for
    files: the quota in whole blocks, one block in 1,024 for the extent trees of the
    team's files, and ext4's own structures (bitmaps, group descriptors, inode tables,
    root folder), which measured 1.1 MB (2 MiB image), 1.5 MB (20 MiB), 3.2 MB (100 MiB),
    18 MB (1,000 MiB) and 23 MB (60,000 MiB) with these mkfs options: 2 MiB + 2 %, at
    most MKFS_BYTES. ``open_volume`` checks the result holds the quota."""
    blocks = math.ceil(quota / FS_BLOCK)
    return (blocks + blocks // 1024 + 1) * FS_BLOCK + min(MKFS_BYTES, 2 * 2**20 + quota // 50)


@dataclass
class OutputVolume:
    """A unit's /output: ``path`` (an empty folder the container's users can write to) on
    a filesystem of its own of ``quota`` bytes when ``kernel`` is True (else a plain
    folder). ``close`` unmounts it and deletes everything; use it as a context manager."""

    path: Path
    image: Path | None
    quota: int

    @property
    def kernel(self) -> bool:
        return self.image is not None

    def used_bytes(self) -> int:
        """Bytes the team's files take on its filesystem, open-but-unlinked files included
        (what no walk over names can see)."""
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize - self._empty_used

    def full(self) -> bool:
        """Whether the team's files take more than its quota (the kernel's count, files
        unlinked while open included), or it has filled its filesystem or its inodes."""
        used = self.used_bytes()
        st = os.statvfs(self.path)
        # a file of exactly the quota also takes its extent blocks and its last block's slack
        return used > self.quota + self.quota // 1024 + 2 * FS_BLOCK or st.f_favail == 0

    def close(self) -> None:
        close_volume(self.path, self.image)

    def __enter__(self) -> OutputVolume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    _empty_used: int = 0


def open_volume(path: Path, image: Path | None, quota: int) -> OutputVolume:
    """Make ``path`` an empty folder for a container's /output. With ``image`` (a file path
    on the disk that holds --out), the folder is the root of an ext4 filesystem of its own
    in that file, with room for ``quota`` bytes of files: the file's blocks are allocated
    now (an InfrastructureError when the disk has no room: the run's fault, not the
    team's). Without ``image``, a plain folder."""
    close_volume(path, image)
    path.mkdir(parents=True)
    if image is None:
        path.chmod(0o777)
        return OutputVolume(path, None, quota)
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, volume_image_bytes(quota))
            finally:
                os.close(fd)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(image.parent).free
                raise InfrastructureError(
                    f"no room on the disk of {image.parent} for this unit's output quota "
                    f"({quota / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free): free space or "
                    "run fewer units at once, then rerun"
                ) from None
            raise InfrastructureError(f"cannot reserve the output quota in {image}: {err}") from None
        # No journal and no reserved blocks: all of it is the team's; -E nodiscard keeps the
        # reserved blocks reserved; root_owner: the mount point is the runner's.
        _run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            str(FS_BLOCK),
            "-m",
            "0",
            "-O",
            "^has_journal,^resize_inode",
            "-N",
            str(VOLUME_INODES),
            "-E",
            f"nodiscard,root_owner={os.geteuid()}:{os.getegid()}",
            os.fspath(image),
        )
        _run("mount", "-o", "loop,nosuid,nodev,noexec", os.fspath(image), os.fspath(path))
    except BaseException:
        with contextlib.suppress(Exception):
            close_volume(path, image)
        raise
    remove_tree(path / "lost+found")
    path.chmod(0o777)
    volume = OutputVolume(path, image, quota)
    volume._empty_used = volume.used_bytes()
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < quota:
        volume.close()
        raise InfrastructureError(
            f"the output filesystem made for a quota of {quota} bytes holds only "
            f"{st.f_bavail * st.f_frsize} (mkfs.ext4 made more of its own structures than expected)"
        )
    return volume


def mounted_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` (deepest first), from /proc/self/mountinfo."""
    root = os.path.realpath(root)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                # mountinfo escapes space, tab, newline and backslash as octal
                point = fields[4].encode().decode("unicode_escape")
                if point == root or point.startswith(root.rstrip("/") + "/"):
                    found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def close_volume(path: Path, image: Path | None) -> None:
    """Unmount whatever is mounted at or below ``path`` (lazily when busy), then delete
    ``path`` and ``image``. Safe to call on what a killed run left."""
    for point in mounted_under(path):
        if subprocess.run(["umount", os.fspath(point)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", os.fspath(point)], capture_output=True, check=False)
    remove_tree(path)
    if image is not None:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


def keep_copy(source: Path, dest: Path, chunk: int = 8 * 2**20) -> None:
    """Copy the team's file ``source`` to ``dest`` as a new file of the runner's own.

    ``source`` is opened without following a link or blocking on a fifo and must be a
    regular file; ``dest`` is written under a temporary name created exclusively with
    mode 0644 (whatever the umask), synced, renamed, then checked again: a regular file
    owned by this process's user, mode exactly 0644. Raises OSError when any of it fails
    (and leaves no ``dest``)."""
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    tmp = dest.with_name(f".{dest.name}.keeping")
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, f"{source.name} is not a regular file")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEPT_MODE)
        try:
            os.fchmod(out, KEPT_MODE)
            while True:
                piece = os.read(src, chunk)
                if not piece:
                    break
                view = memoryview(piece)
                while view:
                    view = view[os.write(out, view) :]
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(src)
    problem = kept_file_problem(dest)
    if problem:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise OSError(errno.EPERM, f"{dest.name}: {problem}")


def kept_file_problem(path: Path) -> str:
    """'' when ``path`` is what the runner may keep: a regular file (not a link), owned by
    this process's user, mode exactly 0644 (no setuid, setgid, sticky or execute bit);
    else what is wrong."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"cannot be checked ({err.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not the runner's {os.geteuid()}"
    if stat.S_IMODE(st.st_mode) != KEPT_MODE:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, not {KEPT_MODE:04o}"
    return ""
