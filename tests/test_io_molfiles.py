"""Molecule file round trips and the errors bad files must give."""
from __future__ import annotations

import numpy as np
import pytest

from symdiff.data.molecules import MoleculeSet
from symdiff.errors import DataError
from symdiff.io.molfiles import read_molecules, read_records, write_npz, write_sdf, write_xyz

# glycine zwitterion, ethanol (atoms roughly placed; exact geometry is irrelevant for I/O)
GLY_Z = [7, 6, 6, 8, 8, 1, 1, 1, 1, 1]
GLY_Q = [1, 0, 0, 0, -1, 0, 0, 0, 0, 0]


def _mols() -> MoleculeSet:
    rng = np.random.default_rng(0)
    zs = [np.array(GLY_Z), np.array([6, 6, 8, 1, 1, 1, 1, 1, 1]), np.array([35, 6, 1, 1, 1])]
    xs = [rng.normal(size=(len(z), 3)) * 2 for z in zs]
    qs = [np.array(GLY_Q), np.zeros(9, int), np.zeros(5, int)]
    return MoleculeSet.from_lists(zs, xs, ids=[11, 22, 33], charges=qs)


@pytest.mark.parametrize("ext", ["sdf", "xyz", "npz"])
def test_round_trip(tmp_path, ext):
    mols = _mols()
    path = tmp_path / f"m.{ext}"
    {"sdf": write_sdf, "xyz": write_xyz, "npz": write_npz}[ext](path, mols)
    back = read_molecules(path)
    assert len(back) == 3
    np.testing.assert_array_equal(back.offsets, mols.offsets)
    np.testing.assert_array_equal(back.atomic_numbers, mols.atomic_numbers)
    np.testing.assert_array_equal(back.mol_ids, [11, 22, 33])
    tol = 1e-4 if ext == "sdf" else 1e-6
    np.testing.assert_allclose(back.positions, mols.positions, atol=tol)
    np.testing.assert_array_equal(back.formal_charges, mols.formal_charges)
    # the writer leaves no temp files behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{ext}"]


def test_sdf_with_bonds_and_rdkit_agrees(tmp_path):
    from rdkit import Chem

    mols = _mols().select(np.array([0]))
    bonds = [np.array([[0, 1, 1], [1, 2, 1], [2, 3, 2], [2, 4, 1], [0, 5, 1], [0, 6, 1], [0, 7, 1], [1, 8, 1],
                       [1, 9, 1]])]
    path = tmp_path / "gly.sdf"
    write_sdf(path, mols, bonds=bonds)
    rec = read_records(path)
    np.testing.assert_array_equal(rec.bonds[0], bonds[0])
    # RDKit reads our file as the glycine zwitterion
    m = next(iter(Chem.SDMolSupplier(str(path), removeHs=False)))
    assert Chem.MolToSmiles(Chem.RemoveHs(m)) == "[NH3+]CC(=O)[O-]"


def test_read_rdkit_written_sdf(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles("c1ccccc1O"))
    AllChem.EmbedMolecule(m, randomSeed=1)
    path = tmp_path / "phenol.sdf"
    w = Chem.SDWriter(str(path))
    w.write(m)
    w.write(m)
    w.close()
    rec = read_records(path)
    assert len(rec.mols) == 2 and rec.mols.n_atoms.tolist() == [13, 13]
    assert len(rec.bonds[0]) == 13
    np.testing.assert_allclose(rec.mols.positions[:13], m.GetConformer().GetPositions(), atol=1e-4)


def test_nan_coordinates_are_kept(tmp_path):
    mols = _mols()
    mols.positions[3, 1] = np.nan
    for ext, writer in (("sdf", write_sdf), ("xyz", write_xyz), ("npz", write_npz)):
        writer(tmp_path / f"n.{ext}", mols)
        back = read_molecules(tmp_path / f"n.{ext}")
        assert np.isnan(back.positions[3, 1]) and np.isfinite(np.delete(back.positions, 3, axis=0)).all()


def test_empty_file_is_a_clear_error(tmp_path):
    for ext in ("sdf", "xyz"):
        p = tmp_path / f"empty.{ext}"
        p.write_text("\n")
        with pytest.raises(DataError, match="empty"):
            read_molecules(p)


def test_truncated_sdf_names_record(tmp_path):
    p = tmp_path / "t.sdf"
    write_sdf(p, _mols())
    text = p.read_text().splitlines()
    p.write_text("\n".join(text[:-8]) + "\n")  # cut into the third record's atom block
    with pytest.raises(DataError, match=r"record 3 .*truncated"):
        read_molecules(p)


def test_unknown_element_names_line(tmp_path):
    p = tmp_path / "u.xyz"
    p.write_text("2\nmol_id=1\nC 0 0 0\nXq 1.5 0 0\n")
    with pytest.raises(DataError, match=r"u.xyz: molecule 1, line 4: atom 2: 'Xq' is not an element"):
        read_molecules(p)


def test_truncated_xyz(tmp_path):
    p = tmp_path / "t.xyz"
    p.write_text("3\n\nC 0 0 0\nH 1 0 0\n")
    with pytest.raises(DataError, match="truncated"):
        read_molecules(p)


def test_failed_write_keeps_old_file(tmp_path):
    from symdiff.io.atomic import atomic_write_bytes

    p = tmp_path / "keep.sdf"
    write_sdf(p, _mols())
    before = p.read_bytes()

    def dies_halfway(fh):
        fh.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, dies_halfway)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["keep.sdf"]


def test_npz_rejects_foreign_file(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.arange(3))
    with pytest.raises(DataError, match="not a symdiff sample file"):
        read_molecules(p)


def test_v3000_records(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles("C[NH3+]"))
    AllChem.EmbedMolecule(m, randomSeed=3)
    path = tmp_path / "v3.sdf"
    w = Chem.SDWriter(str(path))
    w.SetForceV3000(True)
    w.write(m)
    w.write(m)
    w.close()
    rec = read_records(path)
    assert rec.mols.n_atoms.tolist() == [8, 8]
    assert rec.mols.formal_charges[:8].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert len(rec.bonds[1]) == 7
    np.testing.assert_allclose(rec.mols.positions[8:], m.GetConformer().GetPositions(), atol=1e-4)


# ------------------------------------------------------------------------------- bad charge fields, through the CLI
def _eval_fails(capsys, path) -> str:
    """`symdiff eval --samples PATH`: exit 1, one line on stderr naming the file, no traceback."""
    from symdiff.cli import main as cli_main

    rc = cli_main(["eval", "--samples", str(path), "--dataset", "qm9"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith(f"symdiff eval: error: {path}: ")
    return lines[0]


def _written_then_edited(path, write, old: str, new: str):
    """``write`` the test molecules to ``path``, then replace the one occurrence of ``old`` by ``new``."""
    write(path, _mols())
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    return path


def _charged_xyz(tmp_path, charges: str):
    return _written_then_edited(tmp_path / "c.xyz", write_xyz, "formal_charges=1,0,0,0,-1,0,0,0,0,0",
                                f"formal_charges={charges}")


@pytest.mark.parametrize("charges,why", [
    ("1-,0,0,0,-1,0,0,0,0,0", "'1-' is not a formal charge"),
    ("1,0,0,0,-1,0,0,0,0,x", "'x' is not a formal charge"),
    ("1,0,0,0,-1,0,0", "7 values for 10 atoms"),
])
def test_malformed_xyz_formal_charges_are_one_line(tmp_path, capsys, charges, why):
    line = _eval_fails(capsys, _charged_xyz(tmp_path, charges))
    assert "molecule 1, line 2: malformed formal_charges=" in line and why in line


@pytest.mark.parametrize("charges", ["abc", "0.5,0,0,0,-1,0,0,0,0,0", "300,0,0,0,-1,0,0,0,0,0"])
def test_xyz_formal_charges_are_never_silently_dropped_or_wrapped(tmp_path, charges):
    # before: 'abc' and '0.5,...' were ignored (no charges at all), 300 became 44 in int8
    with pytest.raises(DataError, match=r"c.xyz: molecule 1, line 2: malformed formal_charges="):
        read_molecules(_charged_xyz(tmp_path, charges))


def _charged_sdf(tmp_path, chg_line: str):
    return _written_then_edited(tmp_path / "c.sdf", write_sdf, "M  CHG  2   1   1   5  -1\n", chg_line + "\n")


@pytest.mark.parametrize("chg,why", [
    ("M  CHG  2   1   1  11  -1", "'M  CHG' names atom 11, the record has 10 atoms"),
    ("M  CHG  2   1   1   5 -1.5", "atom index and charge must be integers"),
    ("M  CHG  2   1   1   5   x", "atom index and charge must be integers"),
    ("M  CHG  3   1   1   5  -1", "malformed 'M  CHG' line"),
])
def test_bad_sdf_charge_line_is_one_line(tmp_path, capsys, chg, why):
    line = _eval_fails(capsys, _charged_sdf(tmp_path, chg))
    assert "record 1, line 15" in line and why in line


def test_sdf_charge_on_atom_zero_does_not_land_on_the_last_atom(tmp_path):
    # before: atom 0 became index -1, silently charging the record's last atom
    with pytest.raises(DataError, match=r"c.sdf: record 1, line 15: 'M  CHG' names atom 0"):
        read_molecules(_charged_sdf(tmp_path, "M  CHG  2   0   1   5  -1"))


def test_damaged_npz_sample_file_is_one_line(tmp_path, capsys):
    p = tmp_path / "s.npz"
    write_npz(p, _mols())
    raw = bytearray(p.read_bytes())
    at = raw.find(b"positions.npy") + 200
    raw[at:at + 30] = bytes(b ^ 0x5A for b in raw[at:at + 30])
    p.write_bytes(bytes(raw))
    line = _eval_fails(capsys, p)
    assert "array 'positions' is unreadable" in line


def test_a_directory_given_as_samples_is_not_called_missing(tmp_path, capsys):
    d = tmp_path / "samples.sdf"
    d.mkdir()
    assert _eval_fails(capsys, d).endswith(f"{d}: not a file")
