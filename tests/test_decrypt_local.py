"""A copy in a local or NAS directory is decrypted by gpg reading the file itself, while a thread
hashes it from the page cache: the same verdicts as the copy fed through Python (corrupt, wrong
key, not encrypted at all), with no ciphertext passing through the portal."""

import hashlib
import os
import subprocess
from types import SimpleNamespace

import pytest

from backups import streams
from backups.crypto import Encryption, gpg_failure
from backups.streams import CopyCorrupt, VerifiedReader


def copy_of(path, sha256=None):
    data = path.read_bytes()
    return SimpleNamespace(
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        location=SimpleNamespace(name="primary"),
        key=path.name,
    )


def encrypted(tmp_path, passphrase_file, plain, *args):
    source, target = tmp_path / "plain", tmp_path / "artifact.gpg"
    source.write_bytes(plain)
    subprocess.run(
        ["gpg", "--batch", "--quiet", "--homedir", str(gnupg_home(tmp_path)), "--pinentry-mode", "loopback"]
        + ["--passphrase-file", str(passphrase_file), *args, "-o", str(target), str(source)],
        check=True,
    )
    return target


def gnupg_home(tmp_path):
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    return home


def decrypt(path, copy, into):
    """decrypt_to_fd as PITR's tar sink and the logical restore's scratch file call it."""
    reader = VerifiedReader(copy, open(path, "rb"))
    fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return Encryption().decrypt_to_fd(reader, fd), reader
    finally:
        os.close(fd)
        reader.close()


@pytest.fixture(autouse=True)
def through_python_fails(monkeypatch, request):
    """A byte fed to gpg through Python would go through VerifiedReader.read."""

    def refused(self, n=streams.CHUNK):
        raise AssertionError("the ciphertext went through Python")

    if "through_python" not in request.node.name:
        monkeypatch.setattr(VerifiedReader, "read", refused)


def test_gpg_reads_a_local_copy_itself_and_the_hash_beside_it_checks_every_byte(tmp_path, passphrase_file):
    plain = os.urandom(3 * streams.CHUNK + 12345)  # several of the hash thread's reads
    path = encrypted(tmp_path, passphrase_file, plain, "--symmetric", "--cipher-algo", "AES256")
    result, reader = decrypt(path, copy_of(path), tmp_path / "out")
    assert result.ok and result.status == "decryption ok", result.stderr
    assert (tmp_path / "out").read_bytes() == plain
    assert reader.verified and reader.size == path.stat().st_size and reader.corrupt() is None


def test_a_flipped_byte_is_corrupt_as_when_fed_through_python(tmp_path, passphrase_file):
    path = encrypted(tmp_path, passphrase_file, os.urandom(500_000), "--symmetric", "--cipher-algo", "AES256")
    copy = copy_of(path)  # catalogued before the disk flipped a bit
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CopyCorrupt, match="primary copy artifact.gpg"):
        decrypt(path, copy, tmp_path / "out")


def test_a_wrong_key_is_not_a_corrupt_copy(tmp_path, passphrase_file, settings):
    path = encrypted(tmp_path, passphrase_file, b"rows" * 10_000, "--symmetric", "--cipher-algo", "AES256")
    other = tmp_path / "other-passphrase"
    other.write_text("not the one it was encrypted with\n")
    other.chmod(0o600)
    settings.BACKUP_PASSPHRASE_FILE = str(other)
    result, reader = decrypt(path, copy_of(path), tmp_path / "out")
    assert not result.ok and result.status == "decryption failed"
    assert gpg_failure(result) == "gpg could not decrypt: wrong passphrase or key"
    assert reader.corrupt() is None and reader.verified  # every byte hashed though gpg gave up


def test_a_file_that_was_never_encrypted_does_not_pass_though_gpg_exits_0(tmp_path, passphrase_file):
    """gpg --decrypt of a bare literal-data message writes it and exits 0: the catalogued hash of
    such a swapped file matches, and only gpg's DECRYPTION_OKAY tells it was not encrypted."""
    path = encrypted(tmp_path, passphrase_file, b"plaintext rows\n" * 1000, "--store")
    result, _ = decrypt(path, copy_of(path), tmp_path / "out")
    assert not result.ok, result.stderr


def test_a_copy_read_already_or_not_a_regular_file_goes_through_python(tmp_path, passphrase_file):
    path = encrypted(tmp_path, passphrase_file, b"x" * 1000, "--symmetric", "--cipher-algo", "AES256")
    reader = VerifiedReader(copy_of(path), open(path, "rb"))
    assert reader.local_file() is not None
    reader.read(10)
    assert reader.local_file() is None  # its hash has begun: the rest must follow through read()
    reader.close()
    read_end, write_end = os.pipe()
    piped = VerifiedReader(copy_of(path), os.fdopen(read_end, "rb"))
    assert piped.local_file() is None
    os.close(write_end)
    piped.close()


def test_with_recipients_a_missing_secret_key_is_named(tmp_path, settings):
    """The portal host holds the public key only (the restore worker holds the secret one)."""
    owner = tmp_path / "owner"
    owner.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--quiet", "--homedir", str(owner), "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "dba@example.mv", "ed25519", "cert", "never"], check=True)
    fpr = subprocess.run([*gpg, "--list-keys", "--with-colons"], capture_output=True, text=True).stdout
    fpr = fpr.split("fpr:::::::::")[1].split(":")[0]
    subprocess.run([*gpg, "--quick-add-key", fpr, "cv25519", "encr", "never"], check=True)
    (tmp_path / "plain").write_bytes(b"rows" * 1000)
    path = tmp_path / "artifact.gpg"
    subprocess.run(
        [*gpg, "--trust-model", "always", "-r", fpr, "-o", str(path), "--encrypt", str(tmp_path / "plain")], check=True
    )
    portal = tmp_path / "portal"
    portal.mkdir(mode=0o700)
    public = subprocess.run([*gpg, "--export", fpr], capture_output=True, check=True).stdout
    subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(portal), "--import"], input=public, check=True)
    settings.GNUPGHOME, settings.GPG_RECIPIENTS, settings.BACKUP_PASSPHRASE_FILE = str(portal), [fpr], ""
    result, reader = decrypt(path, copy_of(path), tmp_path / "out")
    assert not result.ok and result.status == "no secret key", result.stderr
    assert "no secret key" in gpg_failure(result).lower() and reader.corrupt() is None


def test_gpg_that_cannot_start_leaves_no_hashing_behind(tmp_path, passphrase_file, monkeypatch):
    """The body fails at once: the hash thread stops instead of reading the rest of the copy."""
    path = encrypted(tmp_path, passphrase_file, os.urandom(4 * streams.CHUNK), "--symmetric", "--cipher-algo", "AES256")

    def no_gpg(*args, **kwargs):
        os.read(kwargs["stdin"], streams.CHUNK)  # gpg read a little, then failed
        raise FileNotFoundError("gpg")

    encryption = Encryption()
    reader = VerifiedReader(copy_of(path), open(path, "rb"))
    monkeypatch.setattr(subprocess, "Popen", no_gpg)
    out = os.open(os.devnull, os.O_WRONLY)
    with pytest.raises(FileNotFoundError):
        encryption.decrypt_to_fd(reader, out)
    os.close(out)
    assert reader.size < path.stat().st_size and not reader.verified  # the hash stopped with gpg
    assert reader.corrupt() is None  # no verdict from a hash stopped part-way (not the rest from gpg's offset)
    reader.close()
