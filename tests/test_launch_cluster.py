"""Every real launcher runs the same config to the same per-step losses as ``hecate train --simulate 4``: torchrun
with two "nodes" on loopback, Open MPI's mpirun, a SLURM job on a private single-node cluster, a Ray job on a
Ray head on loopback. The SLURM and Ray services are started here and stopped by process id. Missing mpirun,
SLURM or Ray makes these tests fail, not skip (``make test`` installs them). Also: a hung rank ends the job
with what the others were waiting in, and bad launcher input fails fast with a clear message."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_simulate_cli import hecate, losses, train_args

pytestmark = pytest.mark.slow  # starts processes

BIN = Path(sys.executable).parent
WORLD = 4
LAYOUT = ["parallel.ep=2", "train.steps=3"]  # DP=4 folded as EDP=2 x EP=2: the MoE all-to-all crosses "nodes"
JOB_DEADLINE_S = 300  # a job on this loaded 2-core machine takes ~30 s; generous for a busy CI runner
SERVICE_START_S = 60  # slurmctld/slurmd answer in < 1 s, Ray's head in ~5-15 s


def require(program: str) -> str:
    path = shutil.which(program) or (str(BIN / program) if (BIN / program).exists() else None)
    if path is None:
        pytest.fail(
            f"{program} is not installed: run `make system-deps` (Open MPI, SLURM, munge) and "
            f"`pip install -e '.[dev,mpi,ray]'`",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(small_data: Path, run: Path) -> list[str]:
    """``CONFIG -o ...`` for ``python -m hecate.launch.worker``: the same arguments ``hecate train`` gets."""
    return train_args(small_data, run, *LAYOUT)[1:]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("simulated") / "run"
    done = hecate(*train_args(small_data, run, *LAYOUT), "--simulate", str(WORLD))
    assert done.returncode == 0, done.stderr
    return losses(run)


def test_torchrun_two_nodes_on_loopback_match_simulated(small_data, tmp_path, reference):
    torchrun = require("torchrun")
    run, port = tmp_path / "run", free_port()
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "hecate-test",
                "-m",
                "hecate.launch.worker",
                *worker_command(small_data, run),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=JOB_DEADLINE_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sorted(p.name for p in (run / "logs").iterdir()) == [f"rank{r}.log" for r in range(WORLD)]
    assert losses(run) == reference


def test_deepspeed_launcher_matches_simulated(small_data, tmp_path, reference):
    """DeepSpeed's launcher sets torchrun's names but LOCAL_SIZE, and appends ``--local_rank``."""
    deepspeed = require("deepspeed")
    run = tmp_path / "run"
    done = subprocess.run(
        [
            deepspeed,
            "--num_gpus",
            str(WORLD),
            "--master_port",
            str(free_port()),
            "--module",
            "hecate.launch.worker",
            *worker_command(small_data, run),
        ],
        capture_output=True,
        text=True,
        timeout=JOB_DEADLINE_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "started by deepspeed: rank 3 of 4" in (run / "logs" / "rank3.log").read_text()
    assert losses(run) == reference


def test_mpi_transport_carries_moe_collectives(small_data, tmp_path, reference):
    """``collectives.transport=mpi``: token all-to-alls and router sums go through mpi4py, same losses."""
    require("mpirun")
    run = tmp_path / "run"
    done = hecate(
        *train_args(small_data, run, *LAYOUT, "collectives.transport=mpi"),
        "--launcher",
        "mpi",
        "--workers",
        str(WORLD),
        timeout=JOB_DEADLINE_S,
    )
    assert done.returncode == 0, done.stderr
    assert "MoE collectives over MpiTransport" in (run / "logs" / "rank2.log").read_text()
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_mpirun_matches_simulated(small_data, tmp_path, reference):
    require("mpirun")
    run = tmp_path / "run"
    done = hecate(
        *train_args(small_data, run, *LAYOUT), "--launcher", "mpi", "--workers", str(WORLD), timeout=JOB_DEADLINE_S
    )
    assert done.returncode == 0, done.stderr
    assert "done: 3 steps" in done.stdout
    assert "mpi: rank 3 of 4" in (run / "logs" / "rank3.log").read_text()
    assert losses(run) == reference


# ---- SLURM: munge + slurmctld + slurmd, everything private to one folder -----------------------------------

SLURM_CONF = """\
ClusterName=hecate-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    """A single-node SLURM cluster of this machine; yields the environment that talks to it."""
    daemons = {name: require(name) for name in ("mungekey", "munged", "slurmctld", "slurmd")}
    require("sbatch")
    root = Path(tempfile.mkdtemp(prefix="hecate-slurm-"))
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o755)  # munged refuses a socket folder others cannot read
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port(), cpus=WORLD))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = root / "munge"
    started = []
    try:
        subprocess.run([daemons["mungekey"], "--create", f"--keyfile={munge}/munge.key"], check=True)
        subprocess.run(
            [
                daemons["munged"],
                f"--key-file={munge}/munge.key",
                f"--socket={munge}/munge.socket.2",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            check=True,
        )  # forks; its pid is in the pid file
        started.append(int((munge / "munged.pid").read_text()))
        for command in ([daemons["slurmctld"], "-D"], [daemons["slurmd"], "-D", "-N", "localhost"]):
            started.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)
            time.sleep(0.5)
        deadline = time.monotonic() + SERVICE_START_S
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                pytest.fail(f"the private SLURM cluster did not come up; logs in {root}/log", pytrace=False)
            time.sleep(0.5)
        yield env
    finally:
        for pid in reversed(started):
            stop(pid)
        shutil.rmtree(root, ignore_errors=True)


def stop(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; waits for our own children so none is left a zombie."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not our child (munged daemonizes): poll it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def test_sbatch_job_on_slurm_matches_simulated(small_data, tmp_path, reference, slurm_cluster):
    run = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    done = hecate(
        "sbatch",
        *worker_command(small_data, run),
        "--nodes",
        "1",
        "--tasks-per-node",
        str(WORLD),
        "--time",
        "00:10:00",
        "--out",
        str(script),
        "--submit",
        env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr
    assert "srun --kill-on-bad-exit=1" in script.read_text()
    job = done.stdout.split("submitted job ")[1].split(";")[0]
    deadline = time.monotonic() + JOB_DEADLINE_S
    while (state := job_state(job, slurm_cluster)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"SLURM job {job} still {state}"
        time.sleep(1)
    output = Path(f"{run}.slurm-{job}.out")
    assert state == "COMPLETED", output.read_text() if output.exists() else state
    assert "slurm: rank 3 of 4" in (run / "logs" / "rank3.log").read_text()
    assert losses(run) == reference


def job_state(job: str, env: dict) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True).stdout
    return shown.split("JobState=")[1].split()[0] if "JobState=" in shown else "UNKNOWN"


# ---- Ray: a head on 127.0.0.1 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on loopback (ENVIRONMENT.md's recipe); yields the dashboard address."""
    ray = require("ray")
    temp = tempfile.mkdtemp(prefix="hecate-ray-")
    dashboard = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--num-cpus",
            str(WORLD),
            "--num-gpus",
            "0",
            "--object-store-memory",
            "200000000",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--temp-dir",
            temp,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + SERVICE_START_S
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not start (exit code {head.poll()}); logs in {temp}", pytrace=False)
                time.sleep(1)
        yield address
    finally:
        stop(head.pid, grace_s=30)  # `ray start --block` stops the head's processes when it is terminated
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its session that outlived it
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_matches_simulated(small_data, tmp_path, reference, ray_head):
    from ray.job_submission import JobSubmissionClient

    from hecate.launch.ray_job import fetch_run_folder, packed_name

    run = tmp_path / "run"
    done = hecate(
        *train_args(small_data, run, *LAYOUT),
        "--launcher",
        "ray",
        "--address",
        ray_head,
        "--workers",
        str(WORLD),
        timeout=JOB_DEADLINE_S,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "done: 3 steps" in done.stdout
    assert losses(run) == reference
    assert "files of the run folder came back from the cluster" in done.stderr
    # The run folder also comes back where no filesystem is shared: fetch the job's copy into an empty folder.
    job = done.stderr.split("submitted Ray job ")[1].split()[0]
    fetched = tmp_path / "fetched"
    driver_node = JobSubmissionClient(ray_head).get_job_info(job).driver_node_id
    assert fetch_run_folder(ray_head, driver_node, packed_name(job), fetched) >= WORLD + 2
    assert (fetched / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    assert all((fetched / "logs" / f"rank{rank}.log").is_file() for rank in range(WORLD))
    assert (run / "checkpoints").is_dir() and not (fetched / "checkpoints").exists()


def test_failing_ray_actor_fails_the_job_with_its_traceback(small_data, tmp_path, ray_head):
    run = tmp_path / "run"
    done = hecate(
        *train_args(small_data, run, "train.steps=3"),
        "--launcher",
        "ray",
        "--address",
        ray_head,
        "--workers",
        "2",
        env={"HECATE_FAULT": "raise@1:2"},
        timeout=JOB_DEADLINE_S,
    )
    assert done.returncode == 2
    assert "rank 1 of 2 failed" in done.stderr + done.stdout
    assert "InjectedFault: injected fault on rank 1 at step 2" in done.stdout + done.stderr


# ---- hangs and bad input -----------------------------------------------------------------------------------


def test_hung_rank_ends_the_job_naming_the_collective(small_data, tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    done = hecate(
        *train_args(small_data, run, "train.steps=5", "train.collective_timeout_s=3"),
        "--simulate",
        "2",
        env={"HECATE_FAULT": "hang@1:2"},
        timeout=120,
    )
    assert time.monotonic() - started < 90
    assert done.returncode == 2
    assert "rank 0 of 2: collective failed in step 2 after waiting in" in done.stderr
    assert "over ranks [0, 1]" in done.stderr and "train.collective_timeout_s=3" in done.stderr


def test_rank_whose_peers_never_join_fails_within_the_timeout(small_data, tmp_path):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hecate.launch.worker",
            *train_args(small_data, tmp_path / "run", "train.collective_timeout_s=3")[1:],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr
    assert "rank 0 of 2 (torchrun) could not join the job at 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--launcher", "mpi", "--workers", "2"], "mpirun was not found on PATH"),
        (
            ["--launcher", "ray", "--workers", "2", "--address", "http://127.0.0.1:9"],
            "cannot submit to the Ray cluster",
        ),
        (["--launcher", "ray", "--workers", "2"], "--launcher ray needs --address"),
    ],
    ids=["no-mpirun", "unreachable-ray", "ray-no-address"],
)
def test_bad_launcher_input_fails_with_a_clear_message(small_data, tmp_path, args, message):
    done = hecate(
        *train_args(small_data, tmp_path / "run", "train.steps=2"), *args, env={"PATH": "/nonexistent"}, timeout=120
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_sbatch_without_slurm_writes_the_script_and_says_how_to_submit(small_data, tmp_path):
    script = tmp_path / "job.sbatch"
    done = hecate(
        "sbatch",
        *worker_command(small_data, tmp_path / "run"),
        "--nodes",
        "2",
        "--tasks-per-node",
        "2",
        "--out",
        str(script),
        "--submit",
        env={"PATH": "/nonexistent"},
        timeout=60,
    )
    assert done.returncode == 2
    assert "sbatch was not found on PATH: SLURM is not installed here" in done.stderr
    assert script.is_file()
