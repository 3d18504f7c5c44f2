"""backups.tarpipe: a tar from one pipe into another, byte for byte, its backup_label and
backup_manifest kept on the way and everything else moved by splice(2)."""

import io
import os
import tarfile
import threading

from backups import tarpipe
from backups.base import TarSniffer

LABEL = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: backupportal run 7\n"
MANIFEST = b'{ "PostgreSQL-Backup-Manifest-Version": 1,\n"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n"Manifest-Checksum": "ab12"}\n'


def a_tar():
    """What pg_basebackup writes, in miniature: the label first, files of awkward sizes (empty,
    one byte, exactly a block, several MiB, a full pipe plus one), a directory, the manifest last."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        members = [("backup_label", LABEL), ("base/1/112", b""), ("base/1/113", b"x")]
        members += [("base/1/114", os.urandom(512)), ("base/1/115", os.urandom(5 * 2**20 + 3))]
        members += [("global/pg_control", os.urandom(tarpipe.PIPE_SIZE + 1))]
        info = tarfile.TarInfo("pg_wal")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members + [("backup_manifest", MANIFEST)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def through(data):
    """`data` forwarded from one pipe into another, read back on the other side."""
    sniffer = TarSniffer()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    tarpipe.widen(in_w, out_w)
    received = bytearray()

    def drain():
        while chunk := os.read(out_r, 1 << 16):
            received.extend(chunk)

    def feed():
        os.write(in_w, data) if data else None
        os.close(in_w)

    threads = [threading.Thread(target=drain), threading.Thread(target=feed)]
    for thread in threads:
        thread.start()
    try:
        tarpipe.forward(in_r, out_w, sniffer)
    finally:
        os.close(in_r)
        os.close(out_w)
        for thread in threads:
            thread.join()
        os.close(out_r)
    return bytes(received), sniffer


def test_the_tar_arrives_unchanged_and_its_label_and_manifest_are_kept():
    data = a_tar()
    received, sniffer = through(data)
    assert received == data
    assert sniffer.label()["LABEL"] == "backupportal run 7"
    assert sniffer.manifest() == MANIFEST
    assert sniffer.wal_range() == (1, "0/2000028", "0/2000100")
    assert sniffer.manifest_checksum() == "ab12"


def test_between_two_files_where_splice_cannot_go_it_is_copied_instead():
    data = a_tar()
    src, dst = os.memfd_create("tar"), os.memfd_create("out")
    try:
        os.write(src, data)
        os.lseek(src, 0, os.SEEK_SET)
        sniffer = TarSniffer()
        tarpipe.forward(src, dst, sniffer)
        assert os.pread(dst, len(data) + 1, 0) == data
        assert sniffer.manifest() == MANIFEST
    finally:
        os.close(src), os.close(dst)


def test_a_tar_cut_anywhere_is_forwarded_as_far_as_it_goes():
    """pg_basebackup dying mid-stream: what came is passed on, nothing more, no error here
    (its exit status says what happened), and a cut manifest is no manifest."""
    data = a_tar()
    for cut in (0, 100, 512, 513, 2048 + 7, len(data) // 2, data.index(MANIFEST) + 40):
        received, sniffer = through(data[:cut])
        assert received == data[:cut], cut
        assert sniffer.wal_range() is None, cut


def test_a_manifest_spanning_a_timeline_switch_gives_the_final_timeline_the_first_start_and_the_end():
    """A standby following a promotion writes one WAL range per timeline, the final one first:
    read as one object, it raised and the backup's catalogue entry failed."""
    from backups.base import Manifest

    text = b"""{ "PostgreSQL-Backup-Manifest-Version": 2, "Files": [],
"WAL-Ranges": [
{ "Timeline": 2, "Start-LSN": "0/5000000", "End-LSN": "0/6000100" },
{ "Timeline": 1, "Start-LSN": "0/4000028", "End-LSN": "0/5000000" }
],
"Manifest-Checksum": "00"}"""
    assert Manifest(text).wal_range() == (2, "0/4000028", "0/6000100")
