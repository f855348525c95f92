"""`--report DIR`: a picture grid of sample molecules, histograms against the reference data, a markdown summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.outputs import write_atomic, write_text_atomic

# Every file a report writes; each goes through a temporary name, so an interrupted report leaves whole files.
REPORT_FILES = ("atom_counts.png", "bond_lengths.png", "molecules.png", "report.md", "metrics.json")
GRID_MOLECULES = 16
REFERENCE_BOND_SAMPLE = 2000
ORDER_NAMES = {1: "single", 2: "double", 3: "triple", 4: "aromatic"}


def _reference_stats(dataset: str) -> tuple[Optional[dict[int, int]], Optional[dict[int, np.ndarray]], str]:
    """(atom-count histogram, {order: bond lengths or (centres, weights)}, description) of the training data."""
    from symdiff.eval.reference import shared_data_dir

    shared = shared_data_dir()
    if dataset == "geom":
        p = shared / "geom_drugs" / "midi_split_stats.json"
        if not p.is_file():
            return None, None, "no reference data found"
        stats = json.loads(p.read_text())["train"]["with_h"]
        hist = {int(k): int(v) for k, v in stats["n_atoms_hist"].items()}
        lengths = {}
        for order, dist in stats["bond_length_dist"].items():
            centres = np.array([float(k) for k in dist], dtype=np.float64)
            weights = np.array(list(dist.values()), dtype=np.float64)
            lengths[int(order)] = (centres, weights)
        return hist, lengths, "GEOM-Drugs MiDi train split statistics (midi_split_stats.json)"
    p = shared / "qm9" / "qm9.npz"
    if not p.is_file():
        return None, None, "no reference data found"
    from symdiff.eval.edm import detect_bonds
    from symdiff.eval.metrics import DATASET_SYMBOLS
    from symdiff.eval.reference import load_qm9_split

    ref = load_qm9_split("train").mols
    values, counts = np.unique(ref.n_atoms, return_counts=True)
    hist = {int(v): int(c) for v, c in zip(values, counts)}
    pick = np.random.default_rng(0).choice(len(ref), size=min(REFERENCE_BOND_SAMPLE, len(ref)), replace=False)
    sub = ref.select(np.sort(pick))
    g = detect_bonds(sub.atomic_numbers, sub.positions, sub.offsets, DATASET_SYMBOLS["qm9"],
                     np.ones(len(sub), dtype=bool))
    lengths = _lengths_by_order(g.bonds, g.lengths)
    return hist, lengths, f"QM9 EDM train split ({len(ref)} molecules; bond lengths from {len(sub)} of them)"


def _lengths_by_order(bonds: list, lengths: list) -> dict[int, np.ndarray]:
    out: dict[int, list] = {}
    for b, ln in zip(bonds, lengths):
        if b is None:
            continue
        for o in (1, 2, 3):
            out.setdefault(o, []).append(ln[b[:, 2] == o])
    return {o: np.concatenate(v) for o, v in out.items() if v}


def _grid(smiles: list[str], path: Path) -> bool:
    from rdkit import Chem, RDLogger
    from rdkit.Chem import Draw

    RDLogger.DisableLog("rdApp.*")
    try:
        mols = [m for m in (Chem.MolFromSmiles(s) for s in smiles[:4 * GRID_MOLECULES]) if m is not None]
    finally:
        RDLogger.EnableLog("rdApp.*")
    mols = mols[:GRID_MOLECULES]
    if not mols:
        return False
    img = Draw.MolsToGridImage(mols, molsPerRow=4, subImgSize=(250, 250), legends=[f"#{i}" for i in range(len(mols))])
    write_atomic(path, lambda fh: img.save(fh, format="PNG"), "--report")
    return True


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120), "--report")
    finally:
        plt.close(fig)


def write_report(out: Path, mols: MoleculeSet, results: dict[str, dict], dataset: str, description: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from symdiff.eval.commands import format_table
    from symdiff.eval.metrics import public

    out.mkdir(parents=True, exist_ok=True)
    ref_hist, ref_lengths, ref_desc = _reference_stats(dataset)

    # atom counts
    fig, ax = plt.subplots(figsize=(7, 4))
    n = mols.n_atoms
    bins = np.arange(0, max(int(n.max()) if len(n) else 1, max(ref_hist) if ref_hist else 1) + 2) - 0.5
    ax.hist(n, bins=bins, density=True, alpha=0.6, label=f"evaluated ({len(n)})")
    if ref_hist:
        ks = np.array(sorted(ref_hist))
        w = np.array([ref_hist[k] for k in ks], dtype=np.float64)
        ax.step(ks, w / w.sum(), where="mid", color="k", label="reference")
    ax.set_xlabel("atoms per molecule")
    ax.set_ylabel("fraction")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, out / "atom_counts.png")

    # bond lengths by order (bonds of the primary protocol: distance rule for EDM, assigned bonds for revised)
    primary = next(iter(results.values()))
    if primary["protocol"] == "edm":
        g = primary["_details"].graphs
        sample_lengths = _lengths_by_order(g.bonds, g.lengths)
    else:
        bl = primary["_details"].bond_lengths
        arr = np.array(bl, dtype=np.float64).reshape(-1, 2)
        sample_lengths = {int(o): arr[arr[:, 0] == o, 1] for o in np.unique(arr[:, 0])}
    def _has_data(v) -> bool:
        return bool(np.sum(v[1]) > 0) if isinstance(v, tuple) else len(v) > 0

    orders = sorted({o for o, v in sample_lengths.items() if _has_data(v)}
                    | {o for o, v in (ref_lengths or {}).items() if _has_data(v)})
    fig, axes = plt.subplots(1, max(len(orders), 1), figsize=(4 * max(len(orders), 1), 3.5), squeeze=False)
    for ax, o in zip(axes[0], orders):
        edges = np.arange(0.8, 2.6, 0.01)
        if o in sample_lengths and np.isfinite(sample_lengths[o]).any():
            ax.hist(sample_lengths[o], bins=edges, density=True, alpha=0.6, label="evaluated")
        if ref_lengths and o in ref_lengths:
            r = ref_lengths[o]
            if isinstance(r, tuple):
                centres, weights = r
                inside = (centres >= edges[0]) & (centres < edges[-1])
                if weights[inside].sum() > 0:
                    ax.hist(centres, bins=edges, weights=weights, density=True, histtype="step", color="k",
                            label="reference")
            else:
                ax.hist(r, bins=edges, density=True, histtype="step", color="k", label="reference")
        ax.set_title(f"{ORDER_NAMES.get(o, o)} bonds")
        ax.set_xlabel("length (Å)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "bond_lengths.png")

    # molecule pictures: valid molecules drawn from their SMILES (revised graphs show real bond orders)
    pick = results.get("revised") or primary
    # distinct molecules first: a conformer set would otherwise fill the grid with one molecule
    smiles = list(dict.fromkeys(s for s, v in zip(pick["_details"].smiles, pick["_details"].valid) if v and s))
    has_grid = _grid(smiles, out / "molecules.png")

    lines = [f"# Evaluation report ({dataset})", "", f"Input: {description}", "",
             "```", format_table(results), "```", ""]
    for r in results.values():
        pr = public(r)
        lines.append(f"- **{pr['protocol']}**: {pr['n_excluded']} excluded inputs "
                     f"{pr['exclusions'] or ''}; RDKit {pr['rdkit_version']}")
        for note in pr.get("notes", []):
            lines.append(f"  - {note}")
    lines += ["", f"Reference for the histograms: {ref_desc}.", "",
              "![atom counts](atom_counts.png)", "", "![bond lengths](bond_lengths.png)", ""]
    if has_grid:
        lines += [f"First {min(GRID_MOLECULES, len(smiles))} distinct valid molecules ({pick['protocol']} protocol):", "",
                  "![molecules](molecules.png)", ""]
    else:
        lines += ["No valid molecule to draw.", ""]
    write_text_atomic(out / "report.md", "\n".join(lines), "--report")
    write_text_atomic(out / "metrics.json", json.dumps({k: public(v) for k, v in results.items()}, indent=2) + "\n",
                      "--report")


__all__ = ["REPORT_FILES", "write_report"]
