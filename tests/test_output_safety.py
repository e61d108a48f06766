"""Write locks, temp names with their owner's pid, stale-temp cleanup and exclusive image names.

The processes here are real (a second Python holding a lock, a killed writer), because a lock
or a pid check tested inside one process proves nothing about two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from maskattn_deploy.errors import OutputBusyError
from maskattn_deploy.locks import lock_path, output_lock, pid_alive, remove_stale_temps
from maskattn_deploy.runtime.outputs import read_png_settings, save_run_pngs
from maskattn_deploy.utils import atomic_dir

HOLD = """
import sys, time
from maskattn_deploy.locks import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(target: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    target = tmp_path / "onnx"
    holder = _holder(target, 30)
    try:
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid}") as err, output_lock(target):
            pass
        assert str(target) in str(err.value) and "another output path" in str(err.value)
        # The atomic folder writer takes the same lock.
        with pytest.raises(OutputBusyError), atomic_dir(target):
            pass
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()


def test_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path: Path) -> None:
    target = tmp_path / "cache-entry"
    holder = _holder(target, 1.0)
    told: list[str] = []
    start = time.monotonic()
    with output_lock(target, wait_s=60, on_wait=told.append):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.3 and len(told) == 1 and "waiting" in told[0]
    assert not lock_path(target).exists()  # released locks leave no file behind


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path) -> None:
    target = tmp_path / "run"
    holder = _holder(target, 60)
    holder.kill()
    holder.wait()
    assert lock_path(target).exists()  # a killed process cannot clean up...
    with output_lock(target):  # ...but the kernel dropped its lock
        assert lock_path(target).read_text().strip() == str(os.getpid())
    assert not lock_path(target).exists()


def test_lock_is_reentrant_in_one_thread(tmp_path: Path) -> None:
    with output_lock(tmp_path / "x"), output_lock(tmp_path / "x"):
        assert lock_path(tmp_path / "x").exists()
    assert not lock_path(tmp_path / "x").exists()


def test_only_our_temps_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    assert not pid_alive(dead) and pid_alive(os.getpid())
    stale_dir = tmp_path / f".onnx.{dead}-abcd1234.partial"
    stale_file = tmp_path / f".00001-s0-0.png.{dead}-x1y2z3w4.tmp"
    live = tmp_path / f".onnx.{os.getppid()}-abcd1234.partial"  # our parent: alive
    foreign = [tmp_path / ".onnx.abcd1234.partial", tmp_path / f".onnx.{dead}.keep", tmp_path / "a"]
    for folder in (stale_dir, live, foreign[0]):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x" * 10)
    for path in (stale_file, foreign[1], foreign[2]):
        path.write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and all(p.exists() for p in foreign)


def test_atomic_dir_removes_the_temp_folder_of_a_killed_writer(tmp_path: Path) -> None:
    target = tmp_path / "onnx"
    leftover = tmp_path / f".onnx.{_dead_pid()}-abcd1234.partial"
    leftover.mkdir()
    (leftover / "unet.onnx").write_bytes(b"x" * 1000)
    (tmp_path / ".onnx.old").mkdir()  # a swap cut short by a kill
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_run_images_take_the_next_free_run_number(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), "red")
    (tmp_path / "00003-s0-0.png").write_bytes(b"someone else's")
    paths = save_run_pngs(
        [image, image], tmp_path, lambda run, i: f"{run:05d}-s0-{i}.png", lambda i: {"i": i}
    )
    assert [p.name for p in paths] == ["00004-s0-0.png", "00004-s0-1.png"]
    assert [read_png_settings(p)["i"] for p in paths] == [0, 1]
    assert (tmp_path / "00003-s0-0.png").read_bytes() == b"someone else's"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_taken_name_moves_the_whole_run_and_overwrites_nothing(tmp_path: Path) -> None:
    """Names the run numbering does not see (another tool's) collide on the second image."""
    image = Image.new("RGB", (8, 8), "blue")
    (tmp_path / "r0-1.png").write_bytes(b"foreign")
    paths = save_run_pngs([image, image], tmp_path, lambda run, i: f"r{run}-{i}.png", lambda i: {})
    assert [p.name for p in paths] == ["r1-0.png", "r1-1.png"]
    assert (tmp_path / "r0-1.png").read_bytes() == b"foreign"
    assert not (tmp_path / "r0-0.png").exists()  # the half-claimed run 0 was given back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0-1.png", "r1-0.png", "r1-1.png"]
