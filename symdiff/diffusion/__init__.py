"""EDM-style diffusion on the CoM-free subspace: noise schedule, noise, likelihood terms, sampling helpers."""
from symdiff.diffusion.schedule import NoiseSchedule, polynomial_alpha2

__all__ = ["NoiseSchedule", "polynomial_alpha2"]
