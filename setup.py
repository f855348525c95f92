"""SymDiff-HPC: E(3)-equivariant molecular diffusion by stochastic symmetrisation, at cluster scale."""
from setuptools import find_packages, setup

setup(
    name="symdiff-hpc",
    version="0.1.0",
    description="Training system for SymDiff (stochastically symmetrised diffusion) on QM9 and GEOM-Drugs",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder (DESIGN.md) but are only ever imported as
    # symdiff.kernels; mapping the folder here keeps a bare top-level `kernels` module out of site-packages.
    packages=find_packages(include=["symdiff", "symdiff.*"]) + ["symdiff.kernels"],
    package_dir={"symdiff.kernels": "kernels"},
    package_data={"symdiff": ["data/bundled/*.npz", "data/bundled/*.md", "eval/data/*.json"]},
    entry_points={"console_scripts": ["symdiff=symdiff.cli:main"]},
)
