"""Who am I and where is everyone: SLURM, MPI, torchrun or a single process."""
