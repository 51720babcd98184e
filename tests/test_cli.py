import subprocess
import sys

from alpro.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "shard" in out and "synth" in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_python_dash_m_alpro():
    r = subprocess.run([sys.executable, "-m", "alpro", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("alpro ")
