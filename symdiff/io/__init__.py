"""Molecule file readers and writers (SDF, XYZ, the project's .npz sample format)."""
from symdiff.io.molfiles import read_molecules, read_records, write_molecules, write_npz, write_sdf, write_xyz

__all__ = ["read_molecules", "read_records", "write_molecules", "write_npz", "write_sdf", "write_xyz"]
