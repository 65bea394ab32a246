"""The trust boundary at the file-system and user level, without a container engine: the
output filesystem the kernel bounds, the kept copy, the quota watch, the engine's user
isolation and the runner's handling of host faults (tests/test_containers.py runs the
same rules against hostile images in podman)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tusrec.data import EVAL, open_data
from tusrec.harness import runner
from tusrec.harness.runner import (
    ContainerResult,
    Limits,
    RunnerError,
    Watch,
    check_isolation,
    engine_isolation,
    image_runs_as_root,
)
from tusrec.harness.volume import (
    KEPT_MODE,
    MKFS_BYTES,
    InfrastructureError,
    close_volume,
    keep_copy,
    kept_file_problem,
    kernel_quota_problem,
    mounted_under,
    open_volume,
    volume_image_bytes,
)

needs_mount = pytest.mark.skipif(bool(kernel_quota_problem()), reason=kernel_quota_problem() or "")
MB = 10**6


def small_data(dataset_factory, tmp_path: Path, n_scans: int):
    names = ("LH_Par_C_DtP", "RH_Per_L_PtD")[:n_scans]
    return open_data(dataset_factory(tmp_path / "data", EVAL, ("050",), names, 6))


def write_bytes(path: Path, n: int) -> int:
    """Write up to ``n`` zero bytes; returns how many the filesystem took."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * 2**16
        try:
            while written < n:
                written += f.write(block[: min(len(block), n - written)])
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return written


# --------------------------------------------------------------------------- the kernel's quota


@needs_mount
def test_output_filesystem_holds_the_quota_and_not_a_byte_more(tmp_path):
    quota = 20 * MB
    volume = open_volume(tmp_path / "out", tmp_path / "img" / "unit.img", quota)
    try:
        assert mounted_under(tmp_path / "out") == [tmp_path / "out"]
        assert list(volume.path.iterdir()) == []  # no lost+found for the team to see
        assert stat.S_IMODE(volume.path.stat().st_mode) == 0o777
        assert os.path.getsize(tmp_path / "img" / "unit.img") == volume_image_bytes(quota)
        # a valid prediction of exactly the quota fits; the filesystem then stops the team
        assert write_bytes(volume.path / "a.h5", quota) == quota
        assert not volume.full()
        taken = write_bytes(volume.path / "b.h5", 10 * quota)
        assert taken <= MKFS_BYTES  # the filesystem's slack beyond the quota, no more
        assert volume.used_bytes() <= volume_image_bytes(quota)
        assert volume.full()
        assert Watch(volume.path, quota, volume=volume).problem().startswith("output over quota")
    finally:
        volume.close()
    assert mounted_under(tmp_path / "out") == []
    assert not (tmp_path / "out").exists() and not (tmp_path / "img" / "unit.img").exists()


@needs_mount
def test_a_file_unlinked_while_open_is_counted(tmp_path):
    volume = open_volume(tmp_path / "out", tmp_path / "unit.img", 30 * MB)
    try:
        hidden = volume.path / "hidden"
        with open(hidden, "wb", buffering=0) as f:
            hidden.unlink()
            try:
                while True:
                    f.write(b"\0" * 2**20)
            except OSError as err:
                assert err.errno == errno.ENOSPC
            # no name is left for a walk to find, but the filesystem is full
            assert list(volume.path.iterdir()) == []
            assert runner.output_usage(volume.path).bytes == 0
            assert volume.used_bytes() >= 30 * MB
            problem = Watch(volume.path, 30 * MB, volume=volume).problem()
            assert problem.startswith("output over quota: ") and problem.endswith(" MB > 30.0 MB")
            assert float(problem.split()[3]) >= 30.0
    finally:
        volume.close()


@needs_mount
def test_a_disk_without_room_for_the_quota_is_the_hosts_fault(tmp_path):
    """The disk that holds --out is itself a small filesystem: a unit whose quota does not
    fit is an InfrastructureError before any container runs, and leaves nothing."""
    disk = open_volume(tmp_path / "disk", tmp_path / "disk.img", 40 * MB)
    try:
        first = open_volume(disk.path / "a", disk.path / "a.img", 20 * MB)
        with pytest.raises(InfrastructureError, match="no room on the disk"):
            open_volume(disk.path / "b", disk.path / "b.img", 20 * MB)
        assert not (disk.path / "b").exists() and not (disk.path / "b.img").exists()
        # the first unit's space was reserved before it ran: it is all still there
        assert write_bytes(first.path / "p.h5", 20 * MB) == 20 * MB
        first.close()
    finally:
        disk.close()


@needs_mount
def test_leftover_mounts_of_a_killed_run_are_removed(tmp_path):
    work = tmp_path / "team" / ".work"
    open_volume(work / "scan1", tmp_path / "v" / "1.img", MB)
    open_volume(work / "scan2", tmp_path / "v" / "2.img", MB)
    assert len(mounted_under(work)) == 2
    close_volume(work, None)
    assert mounted_under(work) == [] and not work.exists()


def test_a_plain_folder_when_no_image_is_given(tmp_path):
    volume = open_volume(tmp_path / "out", None, MB)
    assert not volume.kernel and volume.path.is_dir()
    (volume.path / "x").write_bytes(b"\0" * (2 * MB))
    assert Watch(volume.path, MB, volume=volume).problem().startswith("output over quota")
    volume.close()
    assert not (tmp_path / "out").exists()


def test_a_walk_that_cannot_go_on_is_over_quota(tmp_path):
    """Folders with 255-character names, deeper than PATH_MAX from the host: the walk
    stops with ENAMETOOLONG, and that is over quota, not ignored."""
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 256 > PATH_MAX (4096)
            os.mkdir("d" * 255, dir_fd=fd)
            step = os.open("d" * 255, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = step
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    problem = Watch(out, 10 * MB).problem()
    assert problem.startswith("output over quota: it cannot be walked")
    runner.remove_tree(out)
    assert not out.exists()


# --------------------------------------------------------------------------- what is kept


def test_a_kept_prediction_is_the_runners_own_file(tmp_path):
    """A setuid, executable, world-writable file of the team's is kept as a copy: a
    regular file of the runner's user, mode 0644, the same bytes."""
    team = tmp_path / "team.h5"
    team.write_bytes(b"\x7fELF" + os.urandom(5000))
    os.chmod(team, 0o4777)
    if os.geteuid() == 0:
        os.chown(team, 12345, 12345)
    kept = tmp_path / "kept" / "team.h5"
    kept.parent.mkdir()
    os.umask(old := os.umask(0))  # whatever the umask, the mode is 0644
    try:
        keep_copy(team, kept)
    finally:
        os.umask(old)
    st = os.lstat(kept)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == KEPT_MODE
    assert st.st_uid == os.geteuid()
    assert kept.read_bytes() == team.read_bytes()
    assert kept_file_problem(kept) == ""
    assert [p.name for p in kept.parent.iterdir()] == ["team.h5"]  # no temporary left


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_only_a_regular_file_is_kept(tmp_path, kind):
    target = tmp_path / "secret"
    target.write_bytes(b"host secret")
    team = tmp_path / "team.h5"
    {"symlink": lambda: team.symlink_to(target), "fifo": lambda: os.mkfifo(team), "folder": team.mkdir}[
        kind
    ]()
    kept = tmp_path / "kept.h5"
    with pytest.raises(OSError):
        keep_copy(team, kept)
    assert not kept.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_kept_file_problem_names_each_fault(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(b"x")
    good.chmod(0o644)
    assert kept_file_problem(good) == ""
    good.chmod(0o4644)
    assert "mode 4644" in kept_file_problem(good)
    good.chmod(0o755)
    assert "mode 0755" in kept_file_problem(good)
    link = tmp_path / "link"
    link.symlink_to(good)
    assert kept_file_problem(link) == "not a regular file"
    if os.geteuid() == 0:
        good.chmod(0o644)
        os.chown(good, 4242, 4242)
        assert "owned by uid 4242" in kept_file_problem(good)


def test_a_kept_file_that_changed_type_makes_the_scan_invalid(tmp_path, dataset_factory):
    """Between judging and keeping, the file became a link (a late writer): the scan is
    invalid, nothing is kept, and the row is cached with that verdict."""
    scan = small_data(dataset_factory, tmp_path, 1).select(None)[0]
    out = tmp_path / "work"
    out.mkdir()
    (out / f"{scan.key}.h5").symlink_to("/etc/passwd")
    team_dir = tmp_path / "team"
    (team_dir / "scans").mkdir(parents=True)
    run = runner.PendingRun(runner.Team("t", "img"), scan, {"image": "x"})
    row = {"status": "ok", "message": "", "GPE": 1.0, "GLE": 1.0, "LPE": 1.0, "LLE": 1.0}
    done = runner.record_judgement(run, row, None, out, team_dir, keep=True)
    assert done["status"] == "invalid" and "cannot be kept" in done["message"]
    assert not (team_dir / "predictions" / f"{scan.key}.h5").exists()


def test_the_teams_manifest_is_kept_as_text_not_csv(tmp_path, dataset_factory):
    scan = small_data(dataset_factory, tmp_path, 1).select(None)[0]
    team_dir = tmp_path / "team"
    (team_dir / "scans").mkdir(parents=True)
    (team_dir / "logs").mkdir()
    run = runner.PendingRun(runner.Team("t", "img"), scan, {"image": "x"})
    raw = b"key,status,message\nk,ok,=cmd|' /C calc'!A0\n"
    runner.record_judgement(run, {"status": "failed", "message": ""}, raw, tmp_path, team_dir, keep=False)
    assert (team_dir / "logs" / f"{scan.key}.manifest.txt").read_bytes() == raw
    assert not list((team_dir / "logs").glob("*.csv"))


# --------------------------------------------------------------------------- host faults


class FakeContainer:
    def __init__(self, log: bytes):
        self.log = log

    def logs(self, **_):
        return iter([self.log])


@needs_mount
def test_saving_logs_on_a_full_disk_never_stops_the_run(tmp_path):
    disk = open_volume(tmp_path / "disk", tmp_path / "disk.img", 2 * MB)
    try:
        write_bytes(disk.path / "filler", 10 * MB)
        runner._save_logs(FakeContainer(b"x" * MB), disk.path / "team.log")  # no exception
    finally:
        disk.close()


def test_an_infrastructure_fault_is_retried_then_reported_never_cached(
    tmp_path, dataset_factory, monkeypatch
):
    """The engine fails to start every container of one team: each of its units is tried
    twice, nothing is cached for it, the other team is judged as in a clean run, and the
    run ends with IncompleteRunError naming the units."""
    data = small_data(dataset_factory, tmp_path, 2)
    monkeypatch.setattr(runner, "INFRASTRUCTURE_RETRY_S", 0.0)
    calls = []

    def contain(client, run, staged, team_dir, output_dir, image, limits, labels, watchdog, isolation):
        calls.append(run.team.name)
        if run.team.name == "unlucky":
            raise InfrastructureError(f"{run.team.name} {run.scan.key}: the engine could not start it: boom")
        volume = runner.open_volume(output_dir, None, 10**9)
        return volume, ContainerResult(3, False, 0.1), 10**9

    monkeypatch.setattr(runner, "contain", contain)
    monkeypatch.setattr(runner, "_image_ids", lambda client, teams: {t.name: "sha" for t in teams})
    monkeypatch.setattr(runner, "_remove_leftovers", lambda client, out: None)
    client = SimpleNamespace(
        version=lambda: {"Components": [{"Name": "Podman Engine"}]},
        info=lambda: {"SecurityOptions": []},
    )
    teams = [runner.Team("unlucky", "a"), runner.Team("crashes", "b")]
    out = tmp_path / "out"
    with pytest.raises(runner.IncompleteRunError, match="2 run") as caught:
        runner.run_teams(teams, data, out, Limits(output_fs="walk"), client=client, log=lambda *a, **k: None)
    assert calls.count("unlucky") == 4 and calls.count("crashes") == 2
    assert not (out / "unlucky" / "scans").exists() or not list((out / "unlucky" / "scans").iterdir())
    assert sorted(caught.value.tables["crashes"]["status"]) == ["failed", "failed"]
    assert len(caught.value.tables["unlucky"]) == 0
    assert {u[0] for u in caught.value.undone} == {"unlucky"}


# --------------------------------------------------------------------------- user isolation


def engine(name: str, security: list[str], user: str = ""):
    image = SimpleNamespace(attrs={"Config": {"User": user}})
    return SimpleNamespace(
        version=lambda: {"Components": [{"Name": name}]},
        info=lambda: {"SecurityOptions": security},
        images=SimpleNamespace(get=lambda _: image),
    )


def test_podman_gets_a_user_namespace_per_container():
    iso = engine_isolation(engine("Podman Engine", ["name=seccomp"]), Limits())
    assert iso.userns == "auto" and not iso.root_is_host_root
    assert engine_isolation(engine("Podman Engine", []), Limits(userns="host")).root_is_host_root


def test_docker_isolation_is_the_daemons():
    assert engine_isolation(engine("Engine", ["name=userns"]), Limits()).userns is None
    assert not engine_isolation(engine("Engine", ["name=userns"]), Limits()).root_is_host_root
    assert not engine_isolation(engine("Engine", ["name=rootless"]), Limits()).root_is_host_root
    assert engine_isolation(engine("Engine", ["name=seccomp"]), Limits()).root_is_host_root


def test_keeping_predictions_of_a_root_image_without_a_user_namespace_is_refused():
    teams = [runner.Team("rooty", "img")]
    quiet = lambda *a, **k: None  # noqa: E731
    with pytest.raises(RunnerError, match="--keep-predictions refused: rooty"):
        check_isolation(engine("Engine", [], user=""), teams, Limits(), True, quiet)
    check_isolation(engine("Engine", [], user="10001"), teams, Limits(), True, quiet)  # not root
    check_isolation(engine("Engine", [], user=""), teams, Limits(user="1000:1000"), True, quiet)
    check_isolation(engine("Podman Engine", [], user=""), teams, Limits(), True, quiet)  # userns
    check_isolation(engine("Engine", [], user=""), teams, Limits(), False, quiet)  # nothing kept


@pytest.mark.parametrize(
    ("user", "root"),
    [("", True), ("root", True), ("0", True), ("0:0", True), ("10001", False), ("a:0", False)],
)
def test_which_users_are_root(user, root):
    assert image_runs_as_root(engine("Engine", [], user=user), "img", None) is root


def test_the_user_namespace_reaches_the_engine():
    """The docker SDK allows only 'host' as userns_mode; the runner passes podman's 'auto'
    through the same create call's host config."""
    made = {}

    class Api:
        _version = "1.41"

        def create_container(self, **kwargs):
            made.update(kwargs)
            return {"Id": "abc"}

    client = SimpleNamespace(api=Api(), containers=SimpleNamespace(get=lambda cid: cid))
    options = runner.container_options(Path("/in"), Path("/out"), Limits(), {"l": "v"}, (), "auto")
    assert runner.create_container(client, "img", options) == "abc"
    assert made["host_config"]["UsernsMode"] == "auto"
    assert made["host_config"]["NetworkMode"] == "none" and made["host_config"]["ReadonlyRootfs"]
    assert made["labels"] == {"l": "v"}


def test_mount_tools_are_named_when_missing(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "mkfs.ext4" else "/bin/" + tool)
    if os.geteuid() == 0:
        assert "mkfs.ext4 not found" in kernel_quota_problem()
    with pytest.raises(RunnerError, match="--output-fs kernel"):
        runner.volumes_folder(Path("/tmp/x"), Limits(output_fs="kernel"), log=lambda *a, **k: None)
    notes = []
    assert runner.volumes_folder(Path("/tmp/x"), Limits(), log=lambda m, **k: notes.append(m)) is None
    assert "plain folder" in notes[0]


def test_loop_devices_are_released(tmp_path):
    if kernel_quota_problem():
        pytest.skip(kernel_quota_problem())
    before = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.count("\n")
    for i in range(3):
        open_volume(tmp_path / f"o{i}", tmp_path / f"{i}.img", MB).close()
    after = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.count("\n")
    assert after == before
