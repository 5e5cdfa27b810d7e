"""The checkpoint writer thread on real files (``TrialCheckpoint.save``: torch.save, fsync,
rename), without training: one waiting write per file (newest wins), removals after writes,
reads after writes, a stop bounded by its deadline. A slow disk is a real delay before each
write (``SWEEP_CHECKPOINT_WRITE_DELAY_S``)."""

from __future__ import annotations

import time

import pytest
import torch

from sweep.stores.checkpoint_writer import CheckpointWriter
from sweep.stores.checkpoints import TrialCheckpoint
from sweep.training.checkpoint import read

DELAY_S = 0.3


def _state(epochs: int) -> dict:
    return {"model": {"w": torch.full((4,), float(epochs))}, "epochs": epochs, "steps": 0}


class _Takes:
    """The states the writer asked for (the training thread's copies it used)."""

    def __init__(self):
        self.taken: list[int] = []

    def __call__(self, epochs: int):
        def take() -> dict:
            self.taken.append(epochs)
            return _state(epochs)
        return take


def _checkpoint(tmp_path, notes: list, writer: CheckpointWriter) -> TrialCheckpoint:
    return TrialCheckpoint(tmp_path / "trial-0.pt", {}, 100, writer.deferred(notes.append))


def _epochs(path) -> int:
    return read(path)["state"]["epochs"]


@pytest.fixture
def slow_disk(monkeypatch):
    monkeypatch.setenv("SWEEP_CHECKPOINT_WRITE_DELAY_S", str(DELAY_S))


def test_a_newer_checkpoint_replaces_a_waiting_one_and_notes_follow_their_files(
        tmp_path, slow_disk):
    writer, notes, takes = CheckpointWriter(), [], _Takes()
    ckpt = _checkpoint(tmp_path, notes, writer)
    writer.save(ckpt, takes(1))
    time.sleep(DELAY_S / 3)  # its write is in progress (on the slow disk)
    began = time.perf_counter()
    for epochs in range(2, 6):  # four more boundaries meanwhile
        writer.save(ckpt, takes(epochs))
    assert time.perf_counter() - began < DELAY_S  # handing over never waits for the disk
    assert writer.flush(time.monotonic() + 30)
    assert _epochs(ckpt.path) == 5 and notes[-1] == 5
    assert takes.taken == [1, 5]  # the one being written, then the newest: 2..4 never copied out
    writer.close()


def test_a_removal_waits_for_the_write_in_progress_and_a_read_waits_for_both(tmp_path, slow_disk):
    writer, notes, takes = CheckpointWriter(), [], _Takes()
    ckpt = _checkpoint(tmp_path, notes, writer)
    writer.save(ckpt, takes(1))
    time.sleep(DELAY_S / 3)  # the write is in progress (on the slow disk)
    writer.remove(ckpt.path)
    writer.wait_for(ckpt.path)  # as a retry does before it reads the file
    assert takes.taken == [1] and not ckpt.path.exists()  # written, then removed: not revived
    writer.save(ckpt, takes(2))
    writer.remove(ckpt.path)  # a trial's end before its last write started
    assert writer.flush(time.monotonic() + 30)
    assert not ckpt.path.exists() and takes.taken == [1]  # the waiting write was dropped
    writer.close()


def test_a_stop_writes_what_waits_until_its_deadline_and_drops_the_rest(tmp_path, slow_disk):
    writer, notes, takes = CheckpointWriter(), [], _Takes()
    ckpt = _checkpoint(tmp_path, notes, writer)
    writer.save(ckpt, takes(1))
    assert writer.flush(time.monotonic() + 30) and _epochs(ckpt.path) == 1
    other = TrialCheckpoint(tmp_path / "trial-1.pt", {}, 100, writer.deferred(notes.append))
    writer.save(ckpt, takes(2))
    writer.save(other, takes(7))
    assert not writer.close(time.monotonic() + DELAY_S / 2)  # before the slow write is done
    time.sleep(DELAY_S * 1.5)  # the writer, stopped, wrote nothing more
    assert _epochs(ckpt.path) == 1 and not other.path.exists()  # the previous checkpoint, whole
    assert notes == [1]
