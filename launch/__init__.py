"""How workers start: the CLI, the simulated cluster, torchrun, Ray, MPI, SLURM."""
