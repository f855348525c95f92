"""Raw-format readers, each tested on small files written here in the exact public format from real molecules:
QM9 ``dsgdb9nsd_*.xyz`` (directory and .tar.bz2), GEOM ``drugs_crude.msgpack`` and GEOM ``rdkit_folder`` pickles."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import msgpack
import numpy as np
import pytest

from symdiff.cli import main as cli_main
from symdiff.data.build import build
from symdiff.data.bundled import subset_path
from symdiff.data.qm9 import edm_split_lists, excluded_ids, format_xyz, parse_xyz
from symdiff.data.shards import read_manifest, read_split, verify
from symdiff.errors import DataError, UserError


# ------------------------------------------------------------------------------------------------ QM9 xyz
def _xyz_text(mol_id: int, z: np.ndarray, x: np.ndarray, smiles: str) -> str:
    return format_xyz(mol_id, z, x, smiles=smiles, inchi="InChI=1S/x")


# The first record of the QM9 release (dsgdb9nsd_000001.xyz, methane), as published: tabs, trailing tab on the
# property line, a leading space before non-negative coordinates.
METHANE = (
    "5\n"
    "gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t"
    "-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t\n"
    "C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689\n"
    "H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921\n"
    "H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922\n"
    "H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923\n"
    "H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923\n"
    "1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078\n"
    "C\tC\t\n"
    "InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4\n"
)


def test_parse_the_published_methane_record():
    mol_id, z, x = parse_xyz(METHANE, "dsgdb9nsd_000001.xyz")
    assert mol_id == 1 and z.tolist() == [6, 1, 1, 1, 1]
    np.testing.assert_array_equal(x[0], np.float32([-0.0126981359, 1.0858041578, 0.0080009958]))
    np.testing.assert_array_equal(x[4], np.float32([-0.5238136345, 1.4379326443, 0.9063972942]))


def test_parse_the_published_methane_record_matches_qm9_npz(shared_data):
    q = np.load(shared_data / "qm9" / "qm9.npz")
    assert int(q["mol_id"][0]) == 1
    _, z, x = parse_xyz(METHANE, "dsgdb9nsd_000001.xyz")
    np.testing.assert_array_equal(x, q["positions"][: q["offsets"][1]])
    assert z.tolist() == q["atomic_numbers"][: q["offsets"][1]].tolist()


@pytest.fixture(scope="module")
def subset():
    return np.load(subset_path())


def _pick(subset) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray, str]]]:
    """40 train, 15 valid, 15 test bundled molecules; returns their rows and xyz records."""
    rows = np.concatenate([np.flatnonzero(subset["split_edm"] == s)[:n] for s, n in ((0, 40), (1, 15), (2, 15))])
    rows = np.sort(rows)
    off = subset["offsets"]
    recs = []
    for r in rows:
        z, x = subset["atomic_numbers"][off[r]:off[r + 1]], subset["positions"][off[r]:off[r + 1]].copy()
        if r == rows[0]:
            x[0, 2] = np.float32(2.1e-6)  # exercise the *^ exponent on a real coordinate slot
        recs.append((int(subset["mol_id"][r]), z, x, str(subset["smiles_gdb"][r])))
    return rows, recs


def _uncharacterized_txt() -> str:
    head = ["Uncharacterized molecules", "Index  Formula  ...", "-" * 40]
    return "\n".join(head + [f"{i:>7d}   CxHy   0.0   0.0" for i in excluded_ids()] + ["-" * 40, ""])


def _write_xyz_dir(d: Path, recs, with_excluded: bool = True) -> Path:
    d.mkdir(parents=True)
    for mol_id, z, x, smi in recs:
        (d / f"dsgdb9nsd_{mol_id:06d}.xyz").write_text(_xyz_text(mol_id, z, x, smi))
    if with_excluded:
        # an excluded id: the release ships its file, and the reader must leave it out of every split
        ex = int(excluded_ids()[5])
        (d / f"dsgdb9nsd_{ex:06d}.xyz").write_text(_xyz_text(ex, recs[0][1], recs[0][2], recs[0][3]))
        (d / "uncharacterized.txt").write_text(_uncharacterized_txt())
    return d


def test_parse_xyz_reads_mathematica_exponents():
    z = np.array([6, 1, 1, 1, 1])
    x = np.array([[0.0, 1e-7, -3.5e-5], [1.0, 2.0, 3.0], [-1.0, 0.5, 1e-4], [0, 0, 1], [2, 2, 2]], dtype=np.float32)
    text = _xyz_text(1, z, x, "C")
    assert "*^-5" in text and "*^-7" in text
    mol_id, z2, x2 = parse_xyz(text, "f.xyz")
    assert mol_id == 1 and z2.tolist() == z.tolist()
    np.testing.assert_array_equal(x2, x)


def test_xyz_directory_builds_the_same_molecules_as_the_npz(subset, tmp_path):
    rows, recs = _pick(subset)
    src = _write_xyz_dir(tmp_path / "xyz", recs)
    man = build("qm9", src, tmp_path / "out", shard_size=10_000)
    assert man["excluded_files_seen"] == 1 and man["has_formal_charges"] is False
    got_ids = []
    for s, name in enumerate(("train", "valid", "test")):
        got = read_split(tmp_path / "out", name)
        want_rows = rows[subset["split_edm"][rows] == s]
        assert got.mol_ids.tolist() == subset["mol_id"][want_rows].tolist()
        off = subset["offsets"]
        for k, r in enumerate(want_rows):
            z, x = got.molecule(k)
            assert z.tolist() == subset["atomic_numbers"][off[r]:off[r + 1]].tolist()
            ref = subset["positions"][off[r]:off[r + 1]]
            if r == rows[0]:
                ref = ref.copy()
                ref[0, 2] = np.float32(2.1e-6)
            np.testing.assert_array_equal(x, ref)
        got_ids += got.mol_ids.tolist()
    assert int(excluded_ids()[5]) not in got_ids
    verify(tmp_path / "out")


def test_xyz_tarball_matches_directory(subset, tmp_path):
    _, recs = _pick(subset)
    d = _write_xyz_dir(tmp_path / "xyz", recs)  # with an excluded molecule and uncharacterized.txt
    tar = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar, "w:bz2") as tf:
        for p in sorted(d.iterdir()):
            tf.add(p, arcname=p.name)
    build("qm9", d, tmp_path / "a", shard_size=25)
    assert cli_main(["data", "build", "--dataset", "qm9", "--source", str(tar), "--out", str(tmp_path / "b"),
                     "--shard-size", "25"]) == 0
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert mb["source_format"] == "qm9-xyz-tar" and mb["excluded_files_seen"] == 1
    assert mb["xyz_files_seen"] == len(recs) + 1
    assert ma["splits"] == mb["splits"]  # same shards, byte for byte (sha256)
    cut = tmp_path / "cut.tar.bz2"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read tarball"):
        build("qm9", cut, tmp_path / "c", shard_size=25)
    assert not (tmp_path / "c").exists()


def test_malformed_xyz_is_named(subset, tmp_path):
    _, recs = _pick(subset)
    d = _write_xyz_dir(tmp_path / "xyz", recs[:5], with_excluded=False)
    bad = d / f"dsgdb9nsd_{recs[2][0]:06d}.xyz"
    lines = bad.read_text().splitlines()
    lines[3] = "C\t0.1\tnot-a-number\t0.3\t0.0"
    bad.write_text("\n".join(lines))
    with pytest.raises(DataError, match=bad.name):
        build("qm9", d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a file whose header id disagrees with its name
    bad.write_text(_xyz_text(recs[1][0], recs[2][1], recs[2][2], recs[2][3]))
    with pytest.raises(DataError, match="header says gdb"):
        build("qm9", d, tmp_path / "out")


def test_edm_split_from_ids(subset):
    lists = edm_split_lists()
    assert [len(lists[s]) for s in ("train", "valid", "test")] == [100_000, 17_748, 13_083]
    for s, name in enumerate(("train", "valid", "test")):
        assert np.isin(subset["mol_id"][subset["split_edm"] == s], lists[name]).all()


def test_edm_split_equals_the_reference_file(shared_data):
    ref = np.load(shared_data / "qm9" / "qm9_edm_split.npz")
    lists = edm_split_lists()
    for name in ("train", "valid", "test"):
        assert np.array_equal(lists[name], ref[name])
    assert np.array_equal(excluded_ids(), np.sort(ref["excluded_uncharacterized"]))


# ------------------------------------------------------------------------------------------------ GEOM
@pytest.fixture(scope="module")
def geom_sample():
    from symdiff.data.bundled import geom_sample_path
    return np.load(geom_sample_path())


def _molecules(g):
    """[(smiles, [(Z, X, charges, energy), ...]), ...] with a fixed pseudo-energy per conformer.

    The sample has no energies; the values are made up (seeded) so that the 'lowest-energy' choice is testable.
    """
    rng = np.random.default_rng(0)
    out = []
    off = g["conf_offsets"]
    for m, smi in enumerate(g["mol_key"]):
        confs = []
        for c in np.flatnonzero(g["conf_mol_index"] == m):
            a, b = off[c], off[c + 1]
            confs.append((g["atomic_numbers"][a:b], g["positions"][a:b], g["formal_charges"][a:b],
                          float(-1000.0 * (m + 1) + rng.normal())))
        out.append((str(smi).replace("_", "/"), confs))
    return out


def _expected(mols, keep):
    """Per split: the kept conformers in build order (object order, then energy)."""
    from symdiff.data.geom import SmilesSplitter
    split_of = SmilesSplitter(None, 0)
    exp: dict[str, list] = {}
    for smi, confs in mols:
        order = np.argsort([c[3] for c in confs], kind="stable")[:keep]
        exp.setdefault(split_of(smi), []).extend(confs[j] for j in order)
    return exp


def test_geom_msgpack_keeps_lowest_energy_conformers(geom_sample, tmp_path):
    mols = _molecules(geom_sample)
    path = tmp_path / "drugs_crude.msgpack"
    with open(path, "wb") as f:
        # the public schema: a stream of dicts {SMILES: info}; here two objects
        for chunk in (mols[:2], mols[2:]):
            obj = {smi: {"conformers": [{"xyz": np.column_stack([z, x]).astype(float).tolist(),
                                         "totalenergy": e, "boltzmannweight": 0.1, "geom_id": 1}
                                        for z, x, _, e in confs],
                         "totalconfs": len(confs), "uniqueconfs": len(confs), "charge": 0}
                   for smi, confs in chunk}
            f.write(msgpack.packb(obj))
    keep = 4
    man = build("geom", path, tmp_path / "out", shard_size=5, conformers=keep, split_smiles="none")
    assert man["source_format"] == "geom-msgpack" and man["has_formal_charges"] is False
    exp = _expected(mols, keep)
    total = 0
    for split, confs in exp.items():
        got = read_split(tmp_path / "out", split)
        assert len(got) == len(confs)
        for k, (z, x, _, _) in enumerate(confs):
            gz, gx = got.molecule(k)
            assert gz.tolist() == z.tolist()
            np.testing.assert_array_equal(gx, x)
        total += len(got)
    assert total == sum(min(keep, len(c)) for _, c in mols)
    verify(tmp_path / "out")


def test_geom_msgpack_bad_input(tmp_path):
    p = tmp_path / "bad.msgpack"
    p.write_bytes(msgpack.packb({"CCO": {"conformers": [{"xyz": [[6, 0, 0, 0], [8, 1.4, 0, 0]]}]}}))
    with pytest.raises(DataError, match="'CCO'.*totalenergy"):
        build("geom", p, tmp_path / "o", split_smiles="none")
    p.write_bytes(msgpack.packb({"C[Hg]C": {"conformers": [{"xyz": [[6, 0, 0, 0], [54, 2, 0, 0]],
                                                            "totalenergy": -1.0}]}}))
    with pytest.raises(DataError, match=r"molecule id 0: element\(s\) Z=\[54\]"):
        build("geom", p, tmp_path / "o", split_smiles="none")
    # an empty conformer and a NaN coordinate: named without --skip-invalid, counted and skipped with it
    p.write_bytes(msgpack.packb({"CO": {"conformers": [{"xyz": [], "totalenergy": -2.0},
                                                       {"xyz": [[6, 0, 0, 0], [8, 1.4, 0, float("nan")]],
                                                        "totalenergy": -1.0},
                                                       {"xyz": [[6, 0, 0, 0], [8, 1.4, 0, 0]], "totalenergy": 0.0}]}}))
    with pytest.raises(DataError, match="molecule id 0: empty molecule"):
        build("geom", p, tmp_path / "o", split_smiles="none")
    man = build("geom", p, tmp_path / "o", split_smiles="none", skip_invalid=True)
    assert man["skipped"]["counts"] == {"empty molecule": 1, "non-finite": 1}
    assert sum(s["n_molecules"] for s in man["splits"].values()) == 1


def _rdkit_mol(z, x, q, bonds):
    from rdkit import Chem
    from rdkit.Geometry import Point3D
    rw = Chem.RWMol()
    for zi, qi in zip(z, q):
        a = Chem.Atom(int(zi))
        a.SetFormalCharge(int(qi))
        rw.AddAtom(a)
    types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for i, j, order, _ in bonds:
        rw.AddBond(int(i), int(j), types[int(order)])
    conf = Chem.Conformer(len(z))
    for k, p in enumerate(x):
        conf.SetAtomPosition(k, Point3D(*map(float, p)))
    mol = rw.GetMol()
    mol.AddConformer(conf, assignId=True)
    return mol


def test_geom_rdkit_folder_needs_trust_and_keeps_charges(geom_sample, tmp_path):
    g = geom_sample
    mols = _molecules(g)
    drugs = tmp_path / "rdkit_folder" / "drugs"
    drugs.mkdir(parents=True)
    boff, conf_of = g["conf_bond_offsets"], 0
    for m, (smi, confs) in enumerate(mols):
        entries = []
        for z, x, q, e in confs:
            bonds = g["bonds"][boff[conf_of]:boff[conf_of + 1]]
            entries.append({"rd_mol": _rdkit_mol(z, x, q, bonds), "totalenergy": e, "geom_id": conf_of})
            conf_of += 1
        with open(drugs / f"mol{m}.pickle", "wb") as f:
            pickle.dump({"smiles": smi, "conformers": entries, "charge": 0}, f)
    with pytest.raises(UserError, match="--trust-pickle"):
        build("geom", tmp_path / "rdkit_folder", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    man = build("geom", tmp_path / "rdkit_folder", tmp_path / "out", conformers=3, trust_pickle=True,
                split_smiles="none")
    assert man["has_formal_charges"] is True and man["source_format"] == "geom-rdkit-folder"
    exp = _expected(mols, 3)
    for split, confs in exp.items():
        got = read_split(tmp_path / "out", split)
        assert len(got) == len(confs)
        for k, (z, x, q, _) in enumerate(confs):
            a, b = got.offsets[k], got.offsets[k + 1]
            assert got.atomic_numbers[a:b].tolist() == z.tolist()
            assert got.formal_charges[a:b].tolist() == q.tolist()
            np.testing.assert_allclose(got.positions[a:b], x, atol=1e-6)
    assert any(int(q) != 0 for _, confs in mols for c in confs for q in c[2])  # charges really were exercised


def test_geom_split_is_leak_free_and_uses_midi_lists(shared_data, tmp_path):
    from symdiff.data.geom import SmilesSplitter
    sp = SmilesSplitter(shared_data / "geom_drugs", 0)
    import gzip
    val = gzip.open(shared_data / "geom_drugs" / "midi_split_smiles_val.txt.gz", "rt").read().split()[:50]
    assert all(sp(s) == "valid" for s in val)
    assert sp.from_lists == 50
    src = shared_data / "geom_drugs" / "geom_drugs_sample_10mols.npz"
    man = build("geom", src, tmp_path / "g", split_smiles=shared_data / "geom_drugs")
    assert sum(s["n_molecules"] for s in man["splits"].values()) == 503
    z = np.load(src)
    # conformer k of the file has id k (one part); every molecule's conformers must sit in one split only
    split_of_mol: dict[int, set] = {}
    for name in man["splits"]:
        for cid in read_split(tmp_path / "g", name).mol_ids:
            split_of_mol.setdefault(int(z["conf_mol_index"][cid]), set()).add(name)
    assert len(split_of_mol) == 10 and all(len(v) == 1 for v in split_of_mol.values())
    assert len({next(iter(v)) for v in split_of_mol.values()}) >= 2


def test_geom_edm_permutation_split(geom_sample, tmp_path):
    mols = _molecules(geom_sample)
    path = tmp_path / "drugs_crude.msgpack"
    with open(path, "wb") as f:
        f.write(msgpack.packb({smi: {"conformers": [{"xyz": np.column_stack([z, x]).tolist(), "totalenergy": e}
                                                    for z, x, _, e in confs]} for smi, confs in mols}))
    read_order = [c for _, confs in mols for c in (confs[j] for j in np.argsort([c[3] for c in confs])[:10])]
    m = len(read_order)
    perm = np.random.default_rng(0).permutation(m)
    np.save(tmp_path / "geom_permutation.npy", perm)
    man = build("geom", path, tmp_path / "out", shard_size=8, conformers=10,
                geom_permutation=tmp_path / "geom_permutation.npy")
    assert man["split_method"] == "edm-permutation"
    n_val = int(0.1 * m)
    want = {"valid": perm[:n_val], "test": perm[n_val:2 * n_val], "train": perm[2 * n_val:]}
    for split, idx in want.items():
        got = read_split(tmp_path / "out", split)
        assert len(got) == len(idx)
        for k, i in enumerate(idx):
            np.testing.assert_array_equal(got.molecule(k)[1], read_order[i][1])
    np.save(tmp_path / "short.npy", perm[:-1])
    with pytest.raises(DataError, match="not a permutation"):
        build("geom", path, tmp_path / "o2", conformers=10, geom_permutation=tmp_path / "short.npy")
