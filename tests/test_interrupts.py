"""Stopping a job, on purpose or not, leaves nothing behind, and a job that fails says which rank made it fail.

Each test starts the real launcher (``--simulate``, mpirun, torchrun, a Ray head and a SLURM cluster on loopback),
waits until the ranks train (their heartbeats say so), interrupts it the way a user or a scheduler would, and
checks by the pids it saw - the launcher's process tree and the ranks' heartbeats - that every process ended and
that the launcher's temporary folder is empty. Ranks are also checked to listen on loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch_cluster import free_port, job_state, ray_head, require, slurm_cluster, worker_command  # noqa: F401
from test_simulate_cli import train_args

from hecate.collectives.heartbeat import RUN_SUBFOLDER, read_beats

pytestmark = pytest.mark.slow  # starts processes

START_DEADLINE_S = 180  # workers of a loaded 2-core machine reach their second step within this
STOP_DEADLINE_S = 30  # a launcher's grace (10 s) plus the ranks' own exit
ENDLESS = ["train.steps=100000", "checkpoint.every=0"]


# ---- what the tests look at: processes, sockets, heartbeats ------------------------------------------------


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it, now."""
    tree, found, todo = children_of(), set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += tree.get(pid, [])
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def assert_all_ended(pids: set[int], what: str) -> None:
    deadline = time.monotonic() + STOP_DEADLINE_S
    while (left := sorted(p for p in pids if alive(p))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{what}: still running: " + "; ".join(f"{p} {command_line(p)}" for p in left)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "(ended)"


def listening_addresses(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on (TCP, IPv4 and IPv6), e.g. ``["127.0.0.1:4242"]``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(_address(fields[1]))
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{'.'.join(str(b) for b in reversed(raw))}:{int(port, 16)}"
    words = [raw[i : i + 4][::-1].hex() for i in range(0, 16, 4)]
    return f"[{':'.join(words)}]:{int(port, 16)}"


def is_loopback(address: str) -> bool:
    return address.startswith(
        ("127.", "[00000000:00000000:00000000:00000001]", "[00000000:00000000:ffff0000:0100007f]")
    )


def wait_for_step(
    run: Path, world: int, step: int, process: subprocess.Popen | None = None, deadline_s: float = START_DEADLINE_S
) -> dict:
    """The ranks' heartbeats once every rank runs step ``step`` or later."""
    deadline = time.monotonic() + deadline_s
    while True:
        beats = read_beats(run / RUN_SUBFOLDER, world)
        if len(beats) == world and min(b.step for b in beats.values()) >= step:
            return beats
        if process is not None and process.poll() is not None:
            pytest.fail(
                f"the job ended (exit code {process.returncode}) before step {step}: {process.communicate()[1][-3000:]}"
            )
        assert time.monotonic() < deadline, f"the ranks did not reach step {step}: {beats}"
        time.sleep(0.3)


def start(args: list[str], tmp: Path, env: dict | None = None) -> subprocess.Popen:
    """A launcher in a session of its own (as ``setsid hecate ... &``), with a private temporary folder."""
    tmp.mkdir()
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
    )


def hecate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hecate.launch.cli", *args]


def interrupt(process: subprocess.Popen) -> str:
    """Ctrl-C in a terminal: SIGINT to the launcher's whole process group; returns its stderr."""
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=STOP_DEADLINE_S + 30)
    return stderr


KEPT_CACHES = ("torchinductor_",)  # torch's compile cache: made by every run, kept across runs on purpose


def assert_empty(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir() if not p.name.startswith(KEPT_CACHES))
    assert left == [], f"left in the temporary folder {folder}"


# ---- --simulate ---------------------------------------------------------------------------------------------


def test_stalled_rank_is_named_with_where_it_was_last_seen(small_data, tmp_path):
    """Rank 2 of 4 stops (SIGSTOP) in the middle of training: the job fails naming rank 2, its step and its last
    collective - not only the rank whose collective timed out first."""
    run = tmp_path / "run"
    process = start(
        hecate_command(
            *train_args(small_data, run, "parallel.ep=2", "train.collective_timeout_s=6", *ENDLESS), "--simulate", "4"
        ),
        tmp_path / "tmp",
    )
    beats = wait_for_step(run, 4, 3, process)
    os.kill(beats[2].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        os.kill(beats[2].pid, signal.SIGCONT) if alive(beats[2].pid) else None
    assert process.returncode == 2, stderr
    assert time.monotonic() - stopped_at < 60
    assert "collective failed in step" in stderr
    assert f"never arrived: rank 2 stopped answering [pid {beats[2].pid}, last seen in step " in stderr
    assert "rank 0 stopped answering" not in stderr and "rank 1 stopped answering" not in stderr
    assert_all_ended({b.pid for b in beats.values()}, "simulated ranks")


def test_ctrl_c_of_simulate_leaves_nothing_and_listens_on_loopback(small_data, tmp_path):
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    process = start(hecate_command(*train_args(small_data, run, "parallel.ep=2", *ENDLESS), "--simulate", "2"), tmp)
    beats = wait_for_step(run, 2, 2, process)
    tree = process_tree(process.pid)
    assert {b.pid for b in beats.values()} <= tree
    for pid in sorted(tree):
        assert all(is_loopback(a) for a in listening_addresses(pid)), (pid, listening_addresses(pid))
    stderr = interrupt(process)
    assert process.returncode == 130, stderr
    assert_all_ended(tree, "--simulate")
    assert_empty(tmp)


# ---- mpirun -------------------------------------------------------------------------------------------------


def test_ctrl_c_of_mpi_launcher_stops_every_rank(small_data, tmp_path):
    """mpirun puts each rank in a process group of its own: the terminal's SIGINT does not reach them."""
    require("mpirun")
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    process = start(hecate_command(*train_args(small_data, run, *ENDLESS), "--launcher", "mpi", "--workers", "2"), tmp)
    beats = wait_for_step(run, 2, 2, process)
    tree = process_tree(process.pid)
    ranks = {b.pid for b in beats.values()}
    assert ranks <= tree
    for pid in sorted(ranks):  # gloo, the store and MPI's TCP transport: loopback only
        assert all(is_loopback(a) for a in listening_addresses(pid)), (pid, listening_addresses(pid))
    stderr = interrupt(process)
    assert process.returncode == 130, stderr
    assert_all_ended(tree, "mpirun and its ranks")
    steps = [b.step for b in read_beats(run / RUN_SUBFOLDER, 2).values()]
    time.sleep(2)
    assert [b.step for b in read_beats(run / RUN_SUBFOLDER, 2).values()] == steps, "ranks trained on"
    assert_empty(tmp)


def test_killed_rank_under_mpi_is_named(small_data, tmp_path):
    require("mpirun")
    run = tmp_path / "run"
    process = start(
        hecate_command(*train_args(small_data, run, *ENDLESS), "--launcher", "mpi", "--workers", "2"), tmp_path / "tmp"
    )
    beats = wait_for_step(run, 2, 2, process)
    tree = process_tree(process.pid)
    os.kill(beats[1].pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=STOP_DEADLINE_S + 60)
    assert process.returncode == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert f"rank 1 of 2 (pid {beats[1].pid}) was killed by signal 9 (Killed), last seen in step" in last
    assert_all_ended(tree, "mpirun and its ranks")


def test_rank_of_a_killed_mpirun_stops_by_itself(small_data, tmp_path):
    """mpirun SIGKILLed (no chance to stop its ranks): each rank notices its launcher is gone and ends."""
    require("mpirun")
    run = tmp_path / "run"
    process = start(
        hecate_command(*train_args(small_data, run, *ENDLESS), "--launcher", "mpi", "--workers", "2"), tmp_path / "tmp"
    )
    beats = wait_for_step(run, 2, 2, process)
    mpirun = next(p for p in process_tree(process.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "mpirun")
    os.kill(mpirun, signal.SIGKILL)
    process.communicate(timeout=STOP_DEADLINE_S + 60)
    assert_all_ended({b.pid for b in beats.values()}, "ranks of a killed mpirun")


# ---- torchrun -----------------------------------------------------------------------------------------------


def test_ctrl_c_of_torchrun_stops_every_rank(small_data, tmp_path):
    torchrun = require("torchrun")
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    process = start(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            str(tmp_path / "torchrun-logs"),
            "-m",
            "hecate.launch.worker",
            *worker_command(small_data, run)[:-2],
            *[a for o in ENDLESS for a in ("-o", o)],
        ],
        tmp,
    )
    beats = wait_for_step(run, 2, 2, process)
    tree = process_tree(process.pid)
    assert {b.pid for b in beats.values()} <= tree
    interrupt(process)
    assert process.returncode != 0
    assert_all_ended(tree, "torchrun and its ranks")
    # with --log-dir (as the README says) torchrun's agent keeps its logs there, not in a temporary folder
    assert [p.name for p in tmp.iterdir() if not p.name.startswith(KEPT_CACHES)] == []


# ---- Ray ----------------------------------------------------------------------------------------------------


def test_ctrl_c_of_ray_launcher_stops_the_job(small_data, tmp_path, ray_head):  # noqa: F811 - the fixture
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    process = start(
        hecate_command(
            *train_args(small_data, run, *ENDLESS), "--launcher", "ray", "--address", ray_head, "--workers", "2"
        ),
        tmp,
    )
    beats = wait_for_step(run, 2, 2, process)
    tree = process_tree(process.pid)
    stderr = interrupt(process)
    assert process.returncode == 130, stderr
    assert_all_ended(tree | {b.pid for b in beats.values()}, "the Ray job's client, driver and actors")
    assert_empty(tmp)


# ---- SLURM --------------------------------------------------------------------------------------------------


def test_scancel_of_sbatch_job_stops_every_rank(small_data, tmp_path, slurm_cluster):  # noqa: F811 - the fixture
    run, script = tmp_path / "run", tmp_path / "job.sbatch"
    args = worker_command(small_data, run)[:-2] + [a for o in ENDLESS for a in ("-o", o)]
    done = subprocess.run(
        hecate_command("sbatch", *args, "--nodes", "1", "--tasks-per-node", "2", "--out", str(script), "--submit"),
        capture_output=True,
        text=True,
        env=slurm_cluster,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.split("submitted job ")[1].split(";")[0]
    try:
        beats = wait_for_step(run, 2, 2)
    except BaseException:
        subprocess.run(["scancel", job], env=slurm_cluster, check=False)
        raise
    subprocess.run(["scancel", "--full", job], env=slurm_cluster, check=True)
    assert_all_ended({b.pid for b in beats.values()}, "the SLURM job's ranks")
    deadline = time.monotonic() + STOP_DEADLINE_S
    while (state := job_state(job, slurm_cluster)) not in ("CANCELLED", "UNKNOWN"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
