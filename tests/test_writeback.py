"""backupportal.lib.writeback: what the PITR's extraction leaves in the page cache (directories,
the files' last partial blocks) is written to disk while it runs.

Whether the pages were written is the kernel's count of dirty memory, shared with every other
test running beside this one: the effect is measured by the bench (restores/pitr_extract.py's
start-up, 1.9-2.1 s -> 1.5 s), and these tests hold the behaviour around it."""

import time

import pytest

from backupportal.lib.writeback import Writeback, syncfs


def test_syncfs_of_a_directory_returns_and_of_a_missing_one_says_so(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    syncfs(tmp_path)
    with pytest.raises(OSError):
        syncfs(tmp_path / "gone")


def test_the_writeback_runs_while_files_arrive_and_stops_when_told(tmp_path):
    writeback = Writeback(tmp_path, every=0.02)
    for i in range(4):
        (tmp_path / f"f{i}").write_bytes(b"y" * (4 << 20))
        time.sleep(0.03)
    assert writeback.is_alive()
    started = time.monotonic()
    writeback.stop()
    assert not writeback.is_alive() and time.monotonic() - started < 5


def test_a_directory_removed_under_it_ends_the_thread_quietly(tmp_path):
    place = tmp_path / "datadir"
    place.mkdir()
    writeback = Writeback(place, every=0.02)
    place.rmdir()
    writeback.join(timeout=5)
    assert not writeback.is_alive()
    writeback.stop()  # stopping an ended one is harmless


def test_an_extraction_that_cannot_start_zstd_leaves_no_thread_and_no_writeback(tmp_path, monkeypatch):
    import threading

    from restores.pitr_extract import TarSink

    tools = tmp_path / "bin"  # zstd is not there
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    datadir = tmp_path / "data"
    datadir.mkdir(mode=0o777)
    sink = TarSink(datadir, "zstd")
    with pytest.raises(FileNotFoundError):
        sink.open()
    assert sink.extraction is None and sink.writeback is None
    assert not [t for t in threading.enumerate() if t.name.startswith(("writeback", "extract into"))]
