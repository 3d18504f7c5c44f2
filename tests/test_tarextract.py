"""backupportal.lib.tarextract: a base backup's tar from a pipe into a directory, its data
written with O_DIRECT, checked file by file against a manifest (restores.pitr_extract).

The tars here are written by Python's tarfile in ustar format, the format of PostgreSQL's own
writer; the PITR tests extract real base backups through the same code."""

import errno
import io
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import crc32c
import pytest

from backupportal.lib import tarextract
from backupportal.lib.osuser import db_user_ids, is_root
from restores.pitr_extract import TarSink, checksums_checked
from restores.pitr_plan import RestoreFailed

SIZES = [0, 3, 511, 512, 4095, 4096, 4097, (1 << 20) + 5, 3 * (1 << 20), 8192 * 7]


def tar_of(members):
    """A ustar archive of (name, kind, payload) members: kind "file", "dir", "symlink" (payload:
    its target) or a tarfile type constant."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000 + len(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            elif kind == "file":
                info.size, info.mode = len(payload), 0o600
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type, info.linkname = kind, payload
                tar.addfile(info)
    return out.getvalue()


def extract(data, root, direct=True, cut=None):
    """`data` through a pipe into an Extraction of `root`; the finished thread."""
    read, write = os.pipe()
    extraction = tarextract.Extraction(read, root, owner=db_user_ids(), direct=direct)
    extraction.start()
    feeder = threading.Thread(target=feed, args=(write, data[:cut] if cut else data))
    feeder.start()
    feeder.join()
    extraction.join(timeout=60)
    assert not extraction.is_alive()
    return extraction


def feed(fd, data):
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 16]) :]
    except BrokenPipeError:
        pass  # the extraction stopped reading: what it says is the test's
    finally:
        os.close(fd)


def payload(size, seed):
    """`size` bytes that differ from one 4 KiB block to the next (a block written to the wrong
    offset shows)."""
    blocks = (size + 4095) // 4096
    data = b"".join(bytes((i * 31 + seed + n) % 251 for i in range(4096)) for n in range(min(blocks, 64)))
    while len(data) < size:
        data += data
    return data[:size]


@pytest.mark.parametrize("direct", [True, False])
def test_every_size_of_file_comes_out_byte_for_byte_with_its_mode_time_owner_and_crc(tmp_path, direct):
    files = {f"base/5/{1000 + i}": payload(size, i) for i, size in enumerate(SIZES)}
    members = [("./", "dir", None), ("base", "dir", None), ("base/5", "dir", None), ("global/", "dir", None)]
    members += [(name, "file", data) for name, data in files.items()]
    members += [("pg_tblspc", "dir", None), ("pg_tblspc/16400", "symlink", "/srv/tablespace")]
    members += [("PG_VERSION", "file", b"15\n"), ("deep/er/file", "file", b"parents made on the way")]
    root = tmp_path / "data"
    root.mkdir()

    extraction = extract(tar_of(members), root, direct=direct)

    assert extraction.error is None and extraction.finished
    for name, data in [*files.items(), ("PG_VERSION", b"15\n")]:
        path = root / name
        assert path.read_bytes() == data, name
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_mtime == 1_700_000_000 + len(name)
        assert extraction.files[name] == (len(data), crc32c.crc32c(data).to_bytes(4, "little").hex())
        if is_root():
            assert (path.stat().st_uid, path.stat().st_gid) == db_user_ids()
    assert (root / "base/5").stat().st_mtime == 1_700_000_000 + len("base/5")
    assert os.readlink(root / "pg_tblspc/16400") == "/srv/tablespace"
    assert (root / "deep/er/file").read_bytes() == b"parents made on the way"
    # The same bytes as tar -x makes of the same archive.
    by_tar = tmp_path / "by-tar"
    by_tar.mkdir()
    subprocess.run(["tar", "-x", "-C", str(by_tar)], input=tar_of(members), check=True)
    assert subprocess.run(["diff", "-r", "--no-dereference", str(root), str(by_tar)]).returncode == 0


@pytest.mark.parametrize(
    "members, said",
    [
        ([("../escaped", "file", b"x")], "outside the directory"),
        ([("/tmp/absolute", "file", b"x")], "outside the directory"),
        ([("a/../../escaped", "file", b"x")], "outside the directory"),
        ([("link", "symlink", "/tmp"), ("link/escaped", "file", b"x")], "below one of its own symlinks"),
        ([("hard", tarfile.LNKTYPE, "PG_VERSION")], "of type '1'"),
        ([("fifo", tarfile.FIFOTYPE, "")], "of type '6'"),
    ],
)
def test_a_member_that_would_leave_the_directory_or_is_not_a_base_backups_is_refused_by_name(tmp_path, members, said):
    root = tmp_path / "inside" / "data"
    root.mkdir(parents=True)

    extraction = extract(tar_of([("PG_VERSION", "file", b"15\n"), *members]), root)

    assert isinstance(extraction.error, tarextract.TarRefused) and said in str(extraction.error)
    assert not extraction.finished
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "inside" / "escaped").exists()
    assert not Path("/tmp/escaped").exists() and not Path("/tmp/absolute").exists()


def test_a_symlink_put_into_the_directory_is_never_followed_and_nothing_lands_outside(tmp_path):
    """As root the extraction gives each directory to the database user as it makes it: that
    user could put a symlink where the next member goes. Names are resolved from directory
    descriptors with O_NOFOLLOW and files created with O_EXCL, so it is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"root's file")
    root = tmp_path / "data"
    root.mkdir()
    (root / "base").symlink_to(outside)  # a directory of the archive, swapped for a link
    (root / "PG_VERSION").symlink_to(outside / "victim")  # a file of the archive, likewise

    for member in ("base/1/2", "PG_VERSION"):
        (root / "again").mkdir(exist_ok=True)
        extraction = extract(tar_of([(member, "file", b"written by root")]), root)
        assert isinstance(extraction.error, (OSError, tarextract.TarRefused)), extraction.error
        assert not extraction.finished
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"root's file"


def test_a_data_directory_given_as_a_symlink_is_followed_and_made_directories_are_given_away_at_the_end(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    ids = db_user_ids()
    if ids:
        os.chown(real, *ids)  # as prepare_datadir leaves it

    extraction = extract(
        tar_of([("base", "dir", None), ("base/5/f", "file", b"x"), ("g/h", "file", b"y")]), tmp_path / "link"
    )

    assert extraction.error is None and extraction.finished
    assert (real / "base/5/f").read_bytes() == b"x" and (real / "g/h").read_bytes() == b"y"
    if ids:  # root's while it wrote, the database user's once done
        for path in (real, real / "base", real / "base/5", real / "g"):
            assert (path.stat().st_uid, path.stat().st_gid) == ids, path


def test_thousands_of_directories_do_not_hold_a_descriptor_each(tmp_path):
    import resource

    members = [(f"base/{16384 + i}/PG_VERSION", "file", b"15\n") for i in range(600)]
    data = tar_of(members)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 64, hard))  # far fewer than 600 directories
    try:
        extraction = extract(data, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert extraction.error is None and extraction.finished
    assert len(list((tmp_path / "base").iterdir())) == 600


def test_a_member_twice_is_refused_by_name(tmp_path):
    for i, members in enumerate(
        (
            [("f", "file", b"one"), ("f", "file", b"two")],
            [("pg_tblspc/1", "symlink", "/srv/ts"), ("pg_tblspc/1", "symlink", "/srv/other")],
        )
    ):
        root = tmp_path / str(i)
        root.mkdir()
        extraction = extract(tar_of(members), root)
        assert isinstance(extraction.error, tarextract.TarRefused)
        assert "twice" in str(extraction.error) and repr(members[0][0]) in str(extraction.error)


def test_bytes_after_the_end_of_the_archive_or_a_bad_number_are_refused_naming_what(tmp_path):
    data = bytearray(tar_of([("f", "file", b"x")]))
    more = data + b"\1" * 512
    (tmp_path / "a").mkdir()
    assert "goes on after its end-of-archive" in str(extract(bytes(more), tmp_path / "a").error)
    bad = bytearray(data)
    bad[124:136] = b"notoctal\0\0\0\0"
    checksum = tarextract.tar_checksum(bad[:512])
    bad[148:156] = f"{checksum:06o}\0 ".encode()
    (tmp_path / "b").mkdir()
    assert "size of 'f' is not a number" in str(extract(bytes(bad), tmp_path / "b").error)


def test_a_corrupted_header_or_a_stream_cut_short_is_an_error_not_a_short_directory(tmp_path):
    data = tar_of([("base", "dir", None), ("base/1", "file", payload(3 * (1 << 20), 1))])
    flipped = bytearray(data)
    flipped[512 + 10] ^= 0x20  # in the second header's name
    (tmp_path / "a").mkdir()
    assert "checksum is wrong" in str(extract(bytes(flipped), tmp_path / "a").error)

    for cut, said in (
        (512 + 512 + (1 << 20) + 100, "ends in the middle of base/1"),
        (1024 + 3 * (1 << 20), "without its end-of-archive"),
    ):
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        extraction = extract(data, root, cut=cut)
        assert isinstance(extraction.error, tarextract.TarRefused) and said in str(extraction.error)
        assert not extraction.finished


def test_stop_ends_an_extraction_waiting_on_an_idle_pipe_and_closes_it(tmp_path):
    read, write = os.pipe()
    extraction = tarextract.Extraction(read, tmp_path)
    extraction.start()
    os.write(write, tar_of([("f", "file", b"x" * 10_000)])[:1024])  # then nothing more
    time.sleep(0.3)
    started = time.monotonic()
    extraction.stop()
    extraction.join(timeout=5)
    assert not extraction.is_alive() and time.monotonic() - started < 2
    assert extraction.error is None and not extraction.finished
    with pytest.raises(BrokenPipeError):  # the writer into it (gpg, zstd) stops on that
        os.write(write, b"more")
    os.close(write)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system of its own (tmpfs), where mounting is allowed (root in CI)."""
    place = tmp_path / "small"
    place.mkdir()
    if not is_root() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(place)]).returncode:
        pytest.skip("mounting a small file system needs root and CAP_SYS_ADMIN")
    place.chmod(0o777)
    yield place
    subprocess.run(["umount", "-l", str(place)], check=True)


def test_a_full_disk_fails_the_extraction_naming_the_file_and_the_sink_says_so(small_disk):
    datadir = small_disk / "data"
    datadir.mkdir(mode=0o700)
    sink = TarSink(datadir, "gpg")
    sink.open()
    data = tar_of([("base", "dir", None), ("base/16384", "file", payload(8 << 20, 3))])
    feeder = threading.Thread(target=feed, args=(os.dup(sink.fileno()), data))
    feeder.start()
    feeder.join()
    with pytest.raises(RestoreFailed) as failed:
        sink.commit()
    assert sink.extraction.error.errno == errno.ENOSPC
    assert str(failed.value).startswith("could not extract the base backup: No space left on device (")
    assert "base/16384" in str(failed.value)
    sink.abort()
    assert list(datadir.iterdir()) == []


def manifest_plan(tmp_path, files, extracted):
    datadir = tmp_path / "data"
    datadir.mkdir(parents=True)
    entries = [
        {"Path": name, "Size": len(data), "Checksum-Algorithm": "CRC32C", "Checksum": checksum(data)}
        for name, data in files.items()
    ]
    (datadir / "backup_manifest").write_text(__import__("json").dumps({"Files": entries}))
    return SimpleNamespace(datadir=datadir, extracted=extracted, base=SimpleNamespace(pk=7))


def checksum(data):
    return crc32c.crc32c(data).to_bytes(4, "little").hex()


def test_the_manifests_checksums_are_compared_with_the_extracted_files_and_a_difference_is_named(tmp_path):
    files = {"PG_VERSION": b"15\n", "base/5/1259": payload(8192, 5), "\udcffodd": b"name not UTF-8"}
    taken = {name: (len(data), checksum(data)) for name, data in files.items()}
    plan = manifest_plan(tmp_path / "good", files, dict(taken))
    entries = __import__("json").loads((plan.datadir / "backup_manifest").read_text())
    entries["Files"][2] = {
        "Encoded-Path": "\udcffodd".encode("utf-8", "surrogateescape").hex(),
        **{k: v for k, v in entries["Files"][2].items() if k != "Path"},
    }
    (plan.datadir / "backup_manifest").write_text(__import__("json").dumps(entries))
    assert checksums_checked(plan) is True

    bad = manifest_plan(tmp_path / "bad", files, taken | {"base/5/1259": (8192, "00000000")})
    with pytest.raises(RestoreFailed, match='checksum mismatch for file "base/5/1259"'):
        checksums_checked(bad)
    # Not ours to judge: left to pg_verifybackup (a chain pg_combinebackup wrote, a file we did
    # not extract, another algorithm, a manifest that does not parse).
    assert checksums_checked(manifest_plan(tmp_path / "chain", files, None)) is False
    assert checksums_checked(manifest_plan(tmp_path / "missing", files, {})) is False
    other = manifest_plan(tmp_path / "sha", files, taken)
    (other.datadir / "backup_manifest").write_text('{"Files": [{"Path": "x", "Checksum-Algorithm": "SHA256"}]}')
    assert checksums_checked(other) is False
    (other.datadir / "backup_manifest").write_text("{not json")
    assert checksums_checked(other) is False
    for entry in (
        {"Path": ["a"], "Size": 1, "Checksum-Algorithm": "CRC32C", "Checksum": "00"},
        {"Path": "a", "Size": "1", "Checksum-Algorithm": "CRC32C", "Checksum": "00"},
        {"Encoded-Path": 7, "Size": 1, "Checksum-Algorithm": "CRC32C", "Checksum": "00"},
        {"Size": 1, "Checksum-Algorithm": "CRC32C", "Checksum": "00"},
    ):
        (other.datadir / "backup_manifest").write_text(__import__("json").dumps({"Files": [entry]}))
        assert checksums_checked(other) is False, entry
