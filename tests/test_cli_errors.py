"""The CLI's error boundary (symdiff/cli.py) and the one output policy of every command (symdiff/outputs.py)."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

import symdiff.models.commands as info_command
from symdiff.cli import main


def _raising(exc: BaseException):
    def run(args):
        raise exc
    return run


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _main_catching_interrupt(argv: list[str]) -> int:
    # On code without the boundary the interrupt would escape and stop the whole pytest session.
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped symdiff.cli.main")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(info_command, "run", _raising(KeyboardInterrupt()))
    assert _main_catching_interrupt(["info", "--config", "x.yaml"]) == 130
    assert _one_line(capsys.readouterr().err) == "symdiff info: interrupted"


@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "No space left on device"),
                                       (errno.EACCES, "Permission denied"), (errno.EISDIR, "Is a directory"),
                                       (errno.ENOTDIR, "Not a directory"), (errno.ENOENT, "No such file or directory"),
                                       (errno.EROFS, "Read-only file system")])
def test_os_errors_of_the_users_paths_are_one_line_naming_the_file(monkeypatch, capsys, tmp_path, code, text):
    target = tmp_path / "out" / "samples.sdf"
    monkeypatch.setattr(info_command, "run", _raising(OSError(code, text, str(target))))
    assert main(["info", "--config", "x.yaml"]) == 1
    assert _one_line(capsys.readouterr().err) == f"symdiff info: error: {target}: {text}"


def test_full_disk_without_a_file_name_is_still_one_line(monkeypatch, capsys):
    monkeypatch.setattr(info_command, "run", _raising(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["info", "--config", "x.yaml"]) == 1
    assert _one_line(capsys.readouterr().err) == "symdiff info: error: No space left on device"


def test_our_bugs_keep_their_traceback(monkeypatch):
    import symdiff

    monkeypatch.setattr(info_command, "run", _raising(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        main(["info", "--config", "x.yaml"])
    # an OSError that is not about a user's path (a bad file descriptor) is ours too
    monkeypatch.setattr(info_command, "run", _raising(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError):
        main(["info", "--config", "x.yaml"])
    # and so is a file of the package itself that is missing
    ours = f"{symdiff.__path__[0]}/eval/data/missing.json"
    monkeypatch.setattr(info_command, "run", _raising(FileNotFoundError(errno.ENOENT, "No such file", ours)))
    with pytest.raises(FileNotFoundError):
        main(["info", "--config", "x.yaml"])


def test_bad_config_through_the_real_console_script(tmp_path, repo_root):
    """A new user's typo, end to end: the installed `symdiff` prints one line and exits 1."""
    bad = tmp_path / "c.yaml"
    bad.write_text("- data\n- model\n")
    exe = repo_root / ".venv" / "bin" / "symdiff"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "symdiff.cli"]
    res = subprocess.run([*cmd, "train", "--config", str(bad), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "top level is a list" in _one_line(res.stderr)
    res = subprocess.run([*cmd, "train", "--config", str(repo_root / "configs" / "qm9_tiny.yaml"), "--run-dir",
                          str(tmp_path / "run"), "train.ckpt_every=0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "key 'train.ckpt_every': expected an integer >= 1, got 0" in _one_line(res.stderr)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- one policy for every output
def test_info_and_profile_refuse_an_existing_json_unless_overwrite(tmp_path, repo_root, capsys):
    old = '{"keep": "me"}\n'
    out = tmp_path / "out.json"
    out.write_text(old)
    info = ["info", "--config", str(repo_root / "configs" / "qm9_tiny.yaml"), "--json", str(out)]
    profile = ["profile", "--kernels", "com", "--shapes", "qm9", "--batch", "2", "--min-run-time", "0.01",
               "--no-compile", "--device", "cpu", "--json", str(out)]
    for argv in (info, profile):
        assert main(argv) == 1
        assert "already exists; pass --overwrite to replace it" in _one_line(capsys.readouterr().err)
        assert out.read_text() == old
    assert main([*info, "--overwrite"]) == 0
    assert json.loads(out.read_text())["kind"] == "symdiff"
    assert main([*profile, "--overwrite"]) == 0
    assert json.loads(out.read_text())["results"][0]["kernel"] == "com"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out.json"]
    assert leftovers == []  # no temporary files left beside the output


def test_a_reader_that_leaves_the_pipe_is_not_a_traceback(tmp_path, repo_root):
    """`symdiff eval ... | head -1`: the reader closes the pipe early; the writer exits quietly with 141."""
    import textwrap

    script = textwrap.dedent("""
        import sys
        import symdiff.models.commands as info
        from symdiff.cli import main

        def chatty(args):
            for i in range(200000):
                print("row", i)
        info.run = chatty
        sys.exit(main(["info", "--config", "x.yaml"]))
    """)
    reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.readline() == b"row 0\n"
    reader.stdout.close()  # the `head -1`
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
