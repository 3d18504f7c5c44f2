"""A push spool is postgres's: whoever runs as it (any PostgreSQL superuser, through COPY ... TO
PROGRAM) can put a symbolic link, a FIFO or a directory under any name there. The portal (root
here, as in the demo) never writes through one, never reads through one, and refuses what it did
not expect in one line, leaving it for a human; the archive program and normal ingest go on."""

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from backupportal.lib.osuser import as_db_user
from backups import walingest, walspool
from backups.models import WalSegment
from backups.walnames import WalError
from tests.helpers import archive_as_postgres, descendants, manage, run_command
from tests.test_wal_keys import forget_keys, size_of, spool_segments

pytest_plugins = ["tests.walfixtures"]
SECRET = b"correct horse battery staple\n"


def as_postgres(*argv):
    """What the database server's OS user does in its spool (runuser, as PostgreSQL's programs run)."""
    done = subprocess.run(as_db_user([str(a) for a in argv]), capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def push_spool(server, passphrase_file, backup_root, wal_spool):
    """The spool `manage.py archivecommand` makes as root: postgres's, 2770."""
    result = run_command("archivecommand", "maldives")
    assert result["_exit"] == 0, result
    forget_keys()
    return walspool.spool_dir(server)


@pytest.fixture
def outside():
    """A directory of the portal's outside the spool (0700, root's) holding a secret (0600), as the
    passphrase file is; postgres can name it in a link without reaching it."""
    folder = Path(tempfile.mkdtemp(prefix="bp-outside-"))
    (folder / "passphrase").write_bytes(SECRET)
    (folder / "passphrase").chmod(0o600)
    yield folder
    shutil.rmtree(folder)


def untouched(folder, *others):
    """Nothing created in `folder`, nothing removed, the secret as it was."""
    assert sorted(os.listdir(folder)) == sorted(["passphrase", *others])
    assert (folder / "passphrase").read_bytes() == SECRET
    assert stat.S_IMODE((folder / "passphrase").stat().st_mode) == 0o600


def one_line(error):
    text = str(error)
    assert "\n" not in text, text
    return text


def test_the_segment_size_is_published_without_writing_through_a_link(server, push_spool, outside):
    as_postgres("ln", "-s", outside / "passphrase", push_spool / ".segment_size.tmp")
    as_postgres("ln", "-s", outside / "passphrase", push_spool / "segment_size")
    server.wal_segment_size = 1 << 20
    walspool.publish_segment_size(server)
    untouched(outside)
    published = push_spool / "segment_size"
    assert not published.is_symlink() and published.read_text() == "1048576\n"  # the link replaced, not followed
    assert stat.S_IMODE(published.stat().st_mode) == 0o640
    assert (push_spool / ".segment_size.tmp").is_symlink()  # left alone: the portal writes under fresh names


@pytest.mark.parametrize("found", ["link", "postgres's directory"])
def test_an_ingested_directory_postgres_replaced_is_refused_and_nothing_is_written_where_it_points(
    found, server, push_spool, outside
):
    names = spool_segments(server, 2)
    if found == "link":
        as_postgres("mv", push_spool / "ingested", push_spool / "ingested.moved")
        as_postgres("ln", "-s", outside, push_spool / "ingested")
        said = f"{push_spool / 'ingested'} is a symbolic link to {outside}, not a directory"
    else:
        as_postgres("mv", push_spool / "ingested", push_spool / "ingested.moved")
        as_postgres("mkdir", push_spool / "ingested")
        said = f"{push_spool / 'ingested'} belongs to postgres, not to the portal's user root"
    with pytest.raises(WalError) as refused:
        walingest.ingest(server)
    assert said in one_line(refused.value)
    untouched(outside)
    assert list((push_spool / "ingested.moved").iterdir()) == []
    if found == "postgres's directory":
        assert os.listdir(push_spool / "ingested") == []
    # Catalogued (the batch of the first), then kept in the spool: the pass stopped before it could leave it.
    catalogued = list(WalSegment.objects.order_by("name").values_list("name", flat=True))
    assert catalogued[:1] == names[:1]
    assert sorted(p.name for p in push_spool.glob("0*")) == names
    marker = json.loads((push_spool / "errors" / "ingest.json").read_text())
    assert marker["reason"] == "ingest_failed" and said in marker["message"]

    # A human puts the portal's directory back: the catalogued one is a duplicate, the next ingested.
    if found == "link":
        (push_spool / "ingested").unlink()
    else:
        (push_spool / "ingested").rmdir()
    (push_spool / "ingested.moved").rename(push_spool / "ingested")
    result = walingest.ingest(server)
    assert result.duplicates == catalogued and result.ingested == names[len(catalogued) :]
    assert sorted(p.name for p in (push_spool / "ingested").iterdir()) == names
    assert not list(push_spool.glob("0*")) and not (push_spool / "errors" / "ingest.json").exists()


def test_lock_files_planted_as_links_create_nothing_and_the_ingest_goes_on_once_they_are_gone(
    server, push_spool, outside
):
    names = spool_segments(server, 2)
    as_postgres("ln", "-s", outside / "made-by-the-lock", push_spool / ".ingest.lock")
    as_postgres("ln", "-s", outside / "made-by-the-handover", push_spool / walingest.HANDOVER)
    as_postgres("ln", "-s", outside / "nothing", push_spool / ".stale.tmp")  # dangling, old: cleaned up
    os.utime(push_spool / ".stale.tmp", (1, 1), follow_symlinks=False)
    with pytest.raises(WalError) as refused:
        walingest.ingest(server)
    lock = push_spool / ".ingest.lock"
    assert f"{lock} is a symbolic link to {outside / 'made-by-the-lock'}, not the portal's lock file" in one_line(
        refused.value
    )
    assert json.loads((push_spool / "errors" / "ingest.json").read_text())["reason"] == "ingest_failed"
    untouched(outside)
    assert not WalSegment.objects.exists()

    lock.unlink()  # a human's doing; the hand-over link stays, and a lingering pass looks at it
    result = walingest.ingest(server, linger=0.3)
    assert result.ingested == names
    untouched(outside)
    assert (push_spool / walingest.HANDOVER).is_symlink() and not (push_spool / ".stale.tmp").is_symlink()
    assert lock.stat().st_uid == 0 and stat.S_ISREG(lock.lstat().st_mode)


def test_a_lock_file_of_postgres_is_refused(server, push_spool):
    spool_segments(server, 1)
    as_postgres("touch", push_spool / ".ingest.lock")  # it could hold a lock on it forever
    with pytest.raises(WalError, match=r"\.ingest\.lock is a file of postgres, not the portal's lock file"):
        walingest.ingest(server)


def test_an_error_marker_is_never_written_through_a_link(server, push_spool, outside):
    [name] = spool_segments(server, 1)
    assert walingest.ingest(server).ingested == [name]
    (push_spool / name).write_bytes(b"\7" * size_of(server))  # another file under a catalogued name
    as_postgres("ln", "-s", outside / "passphrase", push_spool / "errors" / f"{name}.json")
    result = walingest.ingest(server)
    assert result.conflicts == [name]
    untouched(outside)
    marker = push_spool / "errors" / f"{name}.json"
    assert not marker.is_symlink() and json.loads(marker.read_text())["reason"] == "conflict"


def test_a_symlinked_ahead_directory_never_removes_what_it_points_to(server, push_spool, outside):
    [name] = spool_segments(server, 1)
    (outside / name).write_bytes(b"another server's segment, received and not yet ingested")
    as_postgres("rm", "-r", push_spool / "ahead")
    as_postgres("ln", "-s", outside, push_spool / "ahead")
    assert walingest.ingest(server).ingested == [name]
    untouched(outside, name)


@pytest.mark.parametrize("found", ["a secret of a segment's size", "a directory", "a .history file of 2 MiB"])
def test_a_wal_name_that_is_no_wal_file_is_refused_in_one_line_and_left_there(found, server, push_spool, outside):
    names = spool_segments(server, 3)
    if found == "a secret of a segment's size":
        bad = names[1]
        secret = outside / "key"
        secret.write_bytes(os.urandom(size_of(server)))
        (push_spool / bad).unlink()
        as_postgres("ln", "-s", secret, push_spool / bad)
        said = f"{push_spool / bad} is a symbolic link to {secret}, not a WAL file"
    elif found == "a directory":
        bad = names[1]
        (push_spool / bad).unlink()
        as_postgres("mkdir", push_spool / bad)
        said = f"{push_spool / bad} is a directory, not a WAL file"
    else:
        bad = "00000002.history"
        as_postgres("dd", "if=/dev/zero", f"of={push_spool / bad}", "bs=1M", "count=2", "status=none")
        said = f"{push_spool / bad} is longer than the 1048576 bytes a timeline history file can be"
    with pytest.raises(WalError) as refused:
        walingest.ingest(server)
    assert said in one_line(refused.value) and "left there for you to look at" in str(refused.value)
    before = [n for n in names if n < bad]
    assert list(WalSegment.objects.order_by("name").values_list("name", flat=True)) == before
    assert os.path.lexists(push_spool / bad)  # never deleted
    assert said in json.loads((push_spool / "errors" / "ingest.json").read_text())["message"]
    untouched(outside, *(["key"] if found.startswith("a secret") else []))

    # A human removes it: the WAL after it is ingested.
    if found == "a directory":
        (push_spool / bad).rmdir()
    else:
        (push_spool / bad).unlink()
    assert walingest.ingest(server).ingested == [n for n in names if n > bad]


@pytest.mark.django_db(transaction=True)  # manage.py ingestwal is another process: it must see committed rows
@pytest.mark.parametrize("found", ["a symbolic link to /dev/zero", "a named pipe"])
def test_a_history_file_that_never_ends_does_not_stall_the_ingest(found, server, push_spool, settings):
    bad = push_spool / "00000002.history"
    if found == "a named pipe":
        as_postgres("mkfifo", bad)
    else:
        as_postgres("ln", "-s", "/dev/zero", bad)
    worker = manage(settings, "ingestwal", "maldives")
    try:
        _, err = worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(worker.pid), worker.pid]:
            os.kill(pid, signal.SIGKILL)
        worker.wait()
        pytest.fail(f"the ingest still reads {bad} ({found}) after 60 s, holding the spool's lock")
    assert worker.returncode == 1
    [line] = err.strip().splitlines()
    assert f"{bad} is {found}, not a WAL file" in line, line
    assert os.path.lexists(bad) and not WalSegment.objects.exists()


def test_rerunning_archivecommand_never_chowns_where_a_link_points(server, push_spool, outside):
    as_postgres("rm", "-r", push_spool / "errors")
    as_postgres("ln", "-s", outside, push_spool / "errors")
    result = run_command("archivecommand", "maldives")
    assert result["_exit"] == 1
    [line] = result["_stderr"].strip().splitlines()
    assert f"{push_spool / 'errors'} is a symbolic link to {outside}, not a directory" in line, line
    st = outside.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)
    untouched(outside)


def test_a_spool_the_portal_owns_is_sticky_and_postgres_still_archives_into_it(
    server, passphrase_file, backup_root, wal_spool, segment_file
):
    """Made by the portal's own user (not root), the spool is that user's: sticky, postgres adds
    files but cannot move the portal's. Here the portal is root, giving the spool to itself."""
    spool = walspool.prepare_push_spool(server, db_user="root")
    st = spool.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o3770
    assert stat.S_IMODE((spool / "errors").stat().st_mode) == 0o2770  # the archive program replaces markers there
    postgres_gid = walspool.db_user_ids("postgres")[1]
    for path in (spool, spool / "errors", spool / "ahead", spool / "ingested"):
        os.chown(path, -1, postgres_gid)  # the portal's user is a member of postgres's group
    name = "000000010000000000000042"
    assert archive_as_postgres(server, segment_file(os.urandom(1 << 20)), name).returncode == 0
    moved = subprocess.run(
        as_db_user(["mv", str(spool / "ingested"), str(spool / "elsewhere")]), capture_output=True, text=True
    )
    assert moved.returncode != 0 and "Operation not permitted" in moved.stderr
    assert walingest.ingest(server).ingested == [name]


def test_a_former_push_spool_is_taken_back_for_pg_receivewal(server, push_spool, outside):
    as_postgres("ln", "-s", outside / "passphrase", push_spool / "000000010000000000000001.partial")
    with pytest.raises(WalError, match=r"000000010000000000000001\.partial is a symbolic link to .*: remove it"):
        walspool.prepare_pull_spool(server)
    st = push_spool.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700  # postgres can no longer add anything
    (push_spool / "000000010000000000000001.partial").unlink()
    assert walspool.prepare_pull_spool(server) == push_spool
    untouched(outside)


def test_the_monitor_reads_no_marker_through_a_link_and_retention_unlinks_none_elsewhere(push_spool, server, outside):
    from backups.walhealth import error_markers

    (outside / "marker.json").write_text(json.dumps({"segment": "x", "message": "the portal's own file"}))
    as_postgres("ln", "-s", "/dev/zero", push_spool / "errors" / "000000010000000000000001.json")
    as_postgres("ln", "-s", outside / "marker.json", push_spool / "errors" / "000000010000000000000002.json")

    markers = error_markers(server)  # would never end on /dev/zero, or show the file's contents

    assert [m["message"] for m in markers] == [
        f"unreadable marker {push_spool / 'errors' / f'00000001000000000000000{n}.json'}" for n in (1, 2)
    ]
    # ingested/ replaced by a link to another directory holding a file of a segment's name.
    (outside / "000000010000000000000003").write_text("another server's marker")
    shutil.rmtree(push_spool / "ingested", ignore_errors=True)
    os.symlink(outside, push_spool / "ingested")
    walspool.forget_ingested(server, ["000000010000000000000003"])
    assert (outside / "000000010000000000000003").read_text() == "another server's marker"
    untouched(outside, "marker.json", "000000010000000000000003")
