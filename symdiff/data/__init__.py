"""Molecule data: raw public formats -> sharded HDF5 -> a streaming, distributed, resumable loader."""
