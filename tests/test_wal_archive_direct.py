"""The archive program's copies of segments with O_DIRECT (backups.archive_wal.copy_direct), and
its look-ahead copying two at a time: byte for byte, whatever the reads return, and nothing left
half-written. The program is standard library only and runs here in-process, on real files."""

import os
import shutil
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
    """How much of `path` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_a_segment_goes_to_the_spool_with_o_direct_byte_for_byte(spool, tmp_path):
    data = os.urandom(4 * MIB)
    source = segment(tmp_path, "000000010000000000000003", data)
    archive_wal.copy_into_spool(str(spool), str(source), source.name)
    copy = spool / source.name
    if shutil.which("fincore"):
        # Written with O_DIRECT: nothing of it went through the page cache.
        assert cached_bytes(copy) == 0
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


def test_a_look_ahead_copies_several_segments_two_at_a_time(spool, tmp_path):
    files = []
    for i in range(5):
        data = os.urandom(MIB)
        files.append((segment(tmp_path, f"0000000100000000000000{10 + i:02X}", data), data))
    archive_wal.copy_batch(str(spool), [(str(path), path.name) for path, _ in files])
    for path, data in files:
        assert (spool / path.name).read_bytes() == data
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]


def test_one_bad_segment_in_a_look_ahead_leaves_none_of_the_batch(spool, tmp_path):
    (spool / archive_wal.SIZE_FILE).write_text(f"{MIB}\n")
    files = [segment(tmp_path, f"0000000100000000000000{20 + i:02X}", os.urandom(MIB)) for i in range(4)]
    files.insert(2, segment(tmp_path, "000000010000000000000030", os.urandom(MIB // 2)))  # truncated
    with pytest.raises(archive_wal.WrongSize):
        archive_wal.copy_batch(str(spool), [(str(path), path.name) for path in files])
    assert sorted(os.listdir(spool)) == [archive_wal.SIZE_FILE]  # no temporary, no segment
