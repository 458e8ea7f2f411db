"""The cache: an entry is built once, however many processes ask for it at the same time,
and a builder that is killed leaves no half entry behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

# A process that asks for the cache entry `path` (writing `<started>.asking` just before): its build
# writes `started`, counts itself in `count`, waits until the file `release` exists (at most 60 s),
# and writes the entry's one file.
ASKER = r"""
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from resrl.cache import cached_dir
path, count, started, release = (Path(a) for a in sys.argv[1:5])

def build(tmp):
    with open(count, "a") as f:
        f.write("built\n")
    started.touch()
    t0 = time.time()
    while not release.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    (tmp / "result.txt").write_text("done")

Path(str(started) + ".asking").touch()
got, reused = cached_dir(path, build)
print("reused" if reused else "built", (got / "result.txt").read_text())
"""


def _ask(path: Path, count: Path, started: Path, release: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ASKER, str(path), str(count), str(started), str(release)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, timeout: float = 60) -> None:
    t0 = time.time()
    while not marker.exists():
        assert time.time() - t0 < timeout, f"{marker} never appeared"
        time.sleep(0.05)


def test_two_processes_asking_for_one_entry_build_it_once(tmp_path):
    entry, count, started = tmp_path / "cache" / "warmstart" / "abc", tmp_path / "count", tmp_path / "started"
    release = tmp_path / "release"
    first = _ask(entry, count, started, release)
    _wait_for(started)  # the first is building; the second asks now
    second = _ask(entry, count, tmp_path / "started-2", release)
    _wait_for(tmp_path / "started-2.asking")
    time.sleep(1.0)  # the second is at the entry's lock by now (even on a busy machine)
    release.touch()  # the first finishes its build
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert count.read_text() == "built\n"  # one build
    assert out1.strip() == "built done" and out2.strip() == "reused done"
    assert f"waiting for another process building {entry}" in err2
    assert sorted(p.name for p in entry.parent.iterdir()) == [".abc.lock", "abc"]  # no temporary folder left


def test_a_killed_builder_leaves_no_half_entry_and_the_next_one_builds(tmp_path):
    entry, count, started = tmp_path / "abc", tmp_path / "count", tmp_path / "started"
    builder = _ask(entry, count, started, tmp_path / "never")  # builds until killed
    _wait_for(started)
    (tmp_path / "go").touch()
    waiter = _ask(entry, count, tmp_path / "started-2", tmp_path / "go")  # waits on the builder's lock ...
    _wait_for(tmp_path / "started-2.asking")
    time.sleep(1.0)
    os.kill(builder.pid, signal.SIGKILL)  # ... which the OS drops with the builder
    builder.communicate(timeout=30)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out.strip() == "built done" and count.read_text() == "built\nbuilt\n"
    assert (entry / "result.txt").read_text() == "done"
    assert sorted(p.name for p in tmp_path.glob(".abc*")) == [".abc.lock"]  # the killed one's folder is gone
    assert f"waiting for another process building {entry}" in err
