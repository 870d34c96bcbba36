"""Run under ``mpirun -np N``: the gloo suite's checks over the MPI transport; each rank writes its results
as JSON to ``OUT_DIR/rank<r>.json``. Usage: ``python mpi_main.py OUT_DIR MAX_EXAMPLES``."""

import json
import sys
import time
from pathlib import Path

import torch
from collective_cases import run_all
from mpi4py import MPI

from hecate.collectives import MpiTransport

IDLE_POLL_S = 0.002  # ranks outside a sub-communicator poll instead of spinning on the shared cores


def main(out_dir: str, max_examples: int) -> None:
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    world = MpiTransport(comm)
    subcomms = {size: comm.Split(0 if comm.rank < size else MPI.UNDEFINED, comm.rank) for size in range(1, comm.size)}

    def transport_of_size(size: int):
        if size == comm.size:
            return world
        return None if subcomms[size] == MPI.COMM_NULL else MpiTransport(subcomms[size])

    def wait_for_others() -> None:
        request = comm.Ibarrier()
        while not request.Test():
            time.sleep(IDLE_POLL_S)

    results = run_all(world, transport_of_size, wait_for_others, max_examples)
    Path(out_dir, f"rank{comm.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
