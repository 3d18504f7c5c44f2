"""The archive program's copies of segments with O_DIRECT (backups.archive_wal.copy_direct), and
its look-ahead copying two at a time: byte for byte, whatever the reads return, and nothing left
half-written. The program is standard library only and runs here in-process, on real files."""

import os
import subprocess
import threading
import time

import pytest

from backups import archive_wal

MIB = 1 << 20


@pytest.fixture
def spool(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


def segment(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    return path


def cached_bytes(path):
    """How much of `path` is in the page cache (util-linux's fincore, in every Debian)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def on_tmpfs(path):
    """tmpfs keeps every file in the page cache, O_DIRECT or not (TMPDIR=/dev/shm: tests/conftest.py)."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "tmpfs"


def test_a_segment_goes_to_the_spool_with_o_direct_byte_for_byte(spool, tmp_path):
    data = os.urandom(4 * MIB)
    source = segment(tmp_path, "000000010000000000000003", data)
    archive_wal.copy_into_spool(str(spool), str(source), source.name)
    copy = spool / source.name
    if not on_tmpfs(spool):
        assert cached_bytes(copy) == 0  # written with O_DIRECT: nothing of it went through the page cache
    assert copy.read_bytes() == data
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]


def test_a_segment_read_in_uneven_pieces_from_a_pipe_is_copied_whole(spool, tmp_path):
    data = os.urandom(MIB)
    fifo = tmp_path / "000000010000000000000004"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as writer:
            for start, end in ((0, 8192), (8192, 13001), (13001, 65536), (65536, MIB)):
                writer.write(data[start:end])
                writer.flush()
                time.sleep(0.05)  # each piece a read of its own: aligned, then not, then aligned again

    feeder = threading.Thread(target=feed)
    feeder.start()
    archive_wal.copy_into_spool(str(spool), str(fifo), fifo.name)
    feeder.join()
    assert (spool / fifo.name).read_bytes() == data


def test_without_o_direct_segments_still_go_through_the_page_cache(spool, tmp_path, monkeypatch):
    data = os.urandom(2 * MIB)
    source = segment(tmp_path, "000000010000000000000005", data)
    real_open = os.open

    def refusing(path, flags, *args):  # a file system that refuses O_DIRECT at open (EINVAL)
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    archive_wal.copy_into_spool(str(spool), str(source), source.name)
    assert (spool / source.name).read_bytes() == data


def test_a_look_ahead_copies_several_segments_two_at_a_time(spool, tmp_path, monkeypatch):
    files = []
    for i in range(5):
        data = os.urandom(MIB)
        files.append((segment(tmp_path, f"0000000100000000000000{10 + i:02X}", data), data))
    real, lock = archive_wal.write_temporary, threading.Lock()
    at_once = {"now": 0, "most": 0, "threads": set()}

    def counted(*args):
        with lock:
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
            at_once["threads"].add(threading.get_ident())
        time.sleep(0.1)  # long enough for the other copier to be seen at work
        try:
            return real(*args)
        finally:
            with lock:
                at_once["now"] -= 1

    monkeypatch.setattr(archive_wal, "write_temporary", counted)
    archive_wal.copy_batch(str(spool), [(str(path), path.name) for path, _ in files])
    assert at_once["most"] == archive_wal.COPIERS == 2 and len(at_once["threads"]) == 2
    for path, data in files:
        assert (spool / path.name).read_bytes() == data
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]


def test_a_look_ahead_without_threads_to_be_had_copies_in_the_calling_one(spool, tmp_path, monkeypatch):
    files = [segment(tmp_path, f"0000000100000000000000{40 + i:02X}", os.urandom(MIB)) for i in range(3)]

    def refused(self):
        raise RuntimeError("can't start new thread")  # a limit on processes (systemd's TasksMax)

    monkeypatch.setattr(threading.Thread, "start", refused)
    archive_wal.copy_batch(str(spool), [(str(path), path.name) for path in files])
    for path in files:
        assert (spool / path.name).read_bytes() == path.read_bytes()


def test_a_copier_that_fails_otherwise_than_by_os_error_leaves_nothing_and_the_look_ahead_gives_up(
    spool, tmp_path, monkeypatch
):
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000000000{50 + i:02X}" for i in range(4)]
    for name in names:
        segment(pg_wal, name, os.urandom(MIB))
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    calls, real = [], archive_wal.direct_buffer

    def no_memory():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError  # one copier's buffer cannot be had
        return real()

    monkeypatch.setattr(archive_wal, "direct_buffer", no_memory)
    assert archive_wal.look_ahead(str(spool), str(pg_wal / names[0]), names[0]) == []
    assert os.listdir(spool) == []  # neither a temporary nor a segment of the batch


def test_a_first_o_direct_write_refused_after_the_open_falls_back_to_the_page_cache(spool, tmp_path, monkeypatch):
    import fcntl

    data = os.urandom(2 * MIB)
    source = segment(tmp_path, "000000010000000000000006", data)
    real = os.pwrite

    def refusing(fd, view, offset):  # a file system that takes O_DIRECT at open, not at write
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    archive_wal.copy_into_spool(str(spool), str(source), source.name)
    assert (spool / source.name).read_bytes() == data


def test_one_bad_segment_in_a_look_ahead_leaves_none_of_the_batch(spool, tmp_path):
    (spool / archive_wal.SIZE_FILE).write_text(f"{MIB}\n")
    files = [segment(tmp_path, f"0000000100000000000000{20 + i:02X}", os.urandom(MIB)) for i in range(4)]
    files.insert(2, segment(tmp_path, "000000010000000000000030", os.urandom(MIB // 2)))  # truncated
    with pytest.raises(archive_wal.WrongSize):
        archive_wal.copy_batch(str(spool), [(str(path), path.name) for path in files])
    assert sorted(os.listdir(spool)) == [archive_wal.SIZE_FILE]  # no temporary, no segment
