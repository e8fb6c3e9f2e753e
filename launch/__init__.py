"""Launch helpers: torchrun/SLURM scripts and cluster job templates."""
