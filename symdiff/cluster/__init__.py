"""SLURM support: render the batch scripts of ``slurm/`` for a config and submit them (``symdiff submit``)."""
from symdiff.cluster.render import JOBS, Rendered, SubmitOptions, render
from symdiff.cluster.submit import submit

__all__ = ["JOBS", "Rendered", "SubmitOptions", "render", "submit"]
