"""Every figure the README and docs/ quote from benchmarks/results/ equals its JSON (tools/check_doc_numbers.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
cdn = load_script("tools/check_doc_numbers.py")


def _id(check) -> str:
    return f"{check.doc}:{check.anchor[:40]}:{check.json}"


@pytest.mark.parametrize("check", cdn.CHECKS, ids=_id)
def test_figure_matches_its_json(check):
    cdn._ROOT[0] = REPO
    assert cdn.run_check(check, REPO) == []


def test_every_named_result_file_exists():
    assert cdn.named_results(REPO) == []


def test_figures_quoted_from_the_peer_record_are_in_it():
    if not cdn.PEER_README.is_file():
        pytest.skip(f"{cdn.PEER_README} is absent (needs ../shared beside the checkout)")
    assert cdn.peer_quotes(REPO) == []


def test_a_misquoted_peer_figure_fails(tmp_path):
    peer = tmp_path / "README.md"
    peer.write_text("| SymDiff+ training | 78.8 | 73.7 | 0.95 |\n")  # a record without the quoted 0.93
    errors = cdn.peer_quotes(REPO, peer)
    assert any("0.93 is not in" in e for e in errors)


def _tree(tmp_path: Path) -> Path:
    """A copy of the documents and results, to break on purpose."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    for doc in (REPO / "docs").glob("*.md"):
        shutil.copy(doc, root / "docs" / doc.name)
    shutil.copytree(REPO / "benchmarks" / "results", root / "benchmarks" / "results")
    return root


def test_a_drifted_figure_fails(tmp_path):
    # the shard-build row as it read before it was checked: figures from another run than its JSON
    root = _tree(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert "0.764 s serial; 1.786 s" in text
    readme.write_text(text.replace("0.764 s serial; 1.786 s", "0.47 s serial; 1.04 s"))
    errors = cdn.check_all(root)
    assert any("data_build.json holds 0.764" in e for e in errors)
    assert any("data_build.json holds 1.786" in e for e in errors)


def test_a_rerun_benchmark_that_disagrees_fails(tmp_path):
    root = _tree(tmp_path)
    path = root / "benchmarks" / "results" / "data_build.json"
    path.write_text(path.read_text().replace('"seconds_best": 0.764', '"seconds_best": 0.701'))
    assert any("data_build.json holds 0.701" in e for e in cdn.check_all(root))


def test_a_figure_inside_a_longer_number_does_not_count():
    assert cdn._contains_number("| 0.764 s |", "0.764")
    assert not cdn._contains_number("| 10.764 s |", "0.764")
    assert not cdn._contains_number("| 76.75 % |", "76.7")
    assert not cdn._contains_number("| 1,207,000 |", "207,000")


def test_a_row_without_its_json_named_fails(tmp_path):
    root = _tree(tmp_path)
    eval_md = root / "docs" / "eval.md"
    eval_md.write_text(eval_md.read_text().replace("`eval_qm9_test_revised.json`", ""))
    assert any("eval_qm9_test_revised.json is not named" in e for e in cdn.check_all(root))


def test_a_named_result_file_that_does_not_exist_fails(tmp_path):
    root = _tree(tmp_path)
    (root / "benchmarks" / "results" / "eval_qm9_test_revised.json").unlink()
    errors = cdn.check_all(root)
    assert any("eval_qm9_test_revised.json, which does not exist" in e for e in errors)
