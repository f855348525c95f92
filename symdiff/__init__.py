"""SymDiff-HPC: stochastically symmetrised E(3)-equivariant diffusion for molecules."""
__version__ = "0.1.0"
