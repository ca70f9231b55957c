"""The repository stands alone: .ci/check-self-contained passes here and catches what it must."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / ".ci" / "check-self-contained"


def check(tree):
    return subprocess.run(["bash", str(CHECK), str(tree)], capture_output=True, text=True)


def test_the_repository_carries_no_machine_paths():
    done = check(REPO)
    assert done.returncode == 0, done.stderr


# Samples of machine paths, assembled so that this file carries none itself.
WORK, ROOT = "/" + "work/", "/" + "root/"


@pytest.mark.parametrize("line, bad", [
    (f"perf_analyzer at {WORK}main/.venv/bin/perf_analyzer", True),
    (f"python {ROOT}project/bench.py", True),
    ("see /home/alice/notes", True),
    ("-f /tmp/layerd-kserve-vvn38msu/out.csv", True),
    ("python ../shared/peers/seed_native_server.py", True),
    ("pid /tmp/nginx.pid;", False),
    ("cargo run --release; target/release/layerd", False),
    (f"$HOME/.cargo/bin and ~{WORK}x", False),
])
def test_the_check_fails_on_machine_paths(tmp_path, line, bad):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "notes.md").write_text(f"# notes\n{line}\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "notes.md"], check=True)
    done = check(tmp_path)
    assert (done.returncode != 0) == bad, done.stdout + done.stderr
