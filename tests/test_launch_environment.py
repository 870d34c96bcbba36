"""Each launcher's variables give a worker its rank, world, local rank and master address; incomplete or
inconsistent ones are refused with the variables named. Also the generated mpirun command and sbatch script."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from hecate.collectives.errors import HecateError
from hecate.launch.environment import LaunchError, WorkerEnv, detect
from hecate.launch.mpi import mpirun_command
from hecate.launch.slurm import BatchJob, batch_script

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "head",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}
OMPI = {
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_MCA_ess_base_jobid": "123",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
    "SLURM_JOB_ID": "4242",
    "MASTER_ADDR": "node1",
}
DEEPSPEED = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "0",
    "CROSS_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}
PMI = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_PORT": "1234"}


@pytest.mark.parametrize(
    "environ, expected",
    [
        (TORCHRUN, WorkerEnv("torchrun", 3, 4, 1, 2, "head", 29500, agent_store=True)),
        (OMPI, WorkerEnv("mpi", 2, 4, 2, 4, "127.0.0.1", 20000 + 123)),  # one node: loopback; port from the job id
        (SLURM, WorkerEnv("slurm", 5, 6, 1, 2, "node1", 20000 + 4242)),
        (PMI, WorkerEnv("pmi", 1, 2, 1, 2, "127.0.0.1", 1234)),
        (DEEPSPEED, WorkerEnv("deepspeed", 1, 2, 1, 2, "127.0.0.1", 29500)),
        (SLURM | OMPI | {"MASTER_PORT": "7"}, WorkerEnv("mpi", 2, 4, 2, 4, "node1", 7)),  # mpirun in an sbatch script
        (SLURM | TORCHRUN, WorkerEnv("torchrun", 3, 4, 1, 2, "head", 29500, agent_store=True)),  # srun torchrun
    ],
    ids=["torchrun", "openmpi", "slurm", "pmi", "deepspeed", "mpirun-under-slurm", "torchrun-under-srun"],
)
def test_each_launcher_gives_rank_world_and_master(environ, expected):
    assert detect(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({}, "no launcher environment found"),
        (
            {"RANK": "0", "WORLD_SIZE": "2"},
            "torchrun environment is incomplete: RANK is set but LOCAL_RANK, LOCAL_WORLD_SIZE are not",
        ),
        (TORCHRUN | {"RANK": "4"}, "RANK=4 is not a rank of a world of WORLD_SIZE=4 (0..3)"),
        (TORCHRUN | {"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        (TORCHRUN | {"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not a local rank of 2 ranks on this node"),
        (TORCHRUN | {"LOCAL_WORLD_SIZE": "8"}, "8 ranks on this node, but the world has 4"),
        (TORCHRUN | {"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({k: v for k, v in SLURM.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
        ({k: v for k, v in OMPI.items() if k != "OMPI_MCA_ess_base_jobid"}, "MASTER_PORT is not set"),
        (SLURM | {"SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE='2(x2)'"),
    ],
    ids=[
        "none",
        "partial",
        "rank-range",
        "not-int",
        "local-rank",
        "local-world",
        "port",
        "multinode-no-addr",
        "no-port",
        "slurm-nodes",
    ],
)
def test_inconsistent_launcher_variables_are_refused_by_name(environ, message):
    with pytest.raises(LaunchError) as err:
        detect(environ)
    assert message in str(err.value)


def test_mpirun_command_exports_the_rendezvous():
    command = mpirun_command("/usr/bin/mpirun", 4, ["cfg.yaml", "-o", "train.steps=2"], 29999)
    text = shlex.join(command)
    assert "--oversubscribe" in command and command[command.index("-np") + 1] == "4"
    assert "-x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29999" in text
    assert text.endswith("-m hecate.launch.worker cfg.yaml -o train.steps=2")


def test_sbatch_script_quotes_values_and_is_valid_bash(tmp_path):
    job = BatchJob(
        job_name="hecate-x",
        nodes=2,
        tasks_per_node=8,
        gpus_per_node=8,
        workdir=Path("/work"),
        output=Path("/runs/x.slurm-%j.out"),
        partition="gpu",
        time="02:00:00",
        account="proj",
        worker_args=["/cfg/it's.yaml", "-o", "train.run_dir=/runs/a b", "-o", "x=$(rm -rf /)"],
    )
    script = batch_script(job, "hecate sbatch ...")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
        "#SBATCH --account=proj",
    ):
        assert line in script
    assert "-o 'train.run_dir=/runs/a b'" in script and "-o 'x=$(rm -rf /)'" in script
    assert "'/cfg/it'\"'\"'s.yaml'" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(HecateError, match="partition"):
        batch_script(BatchJob(**{**job.__dict__, "partition": "gpu\n#SBATCH --x"}), "")
