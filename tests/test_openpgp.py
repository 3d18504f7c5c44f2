"""backups.openpgp writes what the real gpg decrypts (and refuses when it was altered), at every
length where the packet encoding changes."""

import io
import os
import subprocess

import pytest

from backups import openpgp

KEY = os.urandom(32).hex()
P = openpgp.PIECE
# one-byte, two-byte and five-byte lengths, and around the partial bodies' size
SIZES = [0, 1, 191, 192, 8383, 8384, P - 1, P, P + 1, 3 * P + 5]


def sealed(data, passphrase=KEY, write_size=100_000):
    out = bytearray()

    class Out:
        def write(self, b):
            out.extend(b)

    writer = openpgp.SymmetricWriter(Out(), passphrase)
    for i in range(0, len(data), write_size):
        writer.write(data[i : i + write_size])
    writer.close()
    return bytes(out)


def gpg_decrypt(ciphertext, passphrase, tmp_path):
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    path = tmp_path / "segment.gpg"
    path.write_bytes(ciphertext)
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0"]
        + ["--decrypt", str(path)],
        input=passphrase.encode() + b"\n",
        capture_output=True,
    )


@pytest.mark.parametrize("size", SIZES)
def test_gpg_decrypts_it(size, tmp_path):
    data = os.urandom(size // 2) + b"wal " * ((size - size // 2) // 4) + b"x" * ((size - size // 2) % 4)
    done = gpg_decrypt(sealed(data), KEY, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data
    assert b"AES256" in done.stderr  # gpg -v would say more; this much it says anyway


@pytest.mark.parametrize("write_size", [1, P - 1, 5 * P + 3])
def test_writes_of_any_size_decrypt(write_size, tmp_path):
    """One write may hold many partial bodies (sent as views of the writer's buffer) or none."""
    data = os.urandom(2 * P + 11) if write_size > 1 else os.urandom(3000)
    done = gpg_decrypt(sealed(data, write_size=write_size), KEY, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data


def test_each_file_has_its_own_salt_and_key(tmp_path):
    data = b"the same segment" * 1000
    one, two = sealed(data), sealed(data)
    assert one[6:14] != two[6:14] and one[20:] != two[20:]


def test_an_altered_byte_is_refused(tmp_path):
    ciphertext = bytearray(sealed(os.urandom(3 * P)))
    ciphertext[len(ciphertext) // 2] ^= 1
    done = gpg_decrypt(bytes(ciphertext), KEY, tmp_path)
    assert done.returncode != 0
    assert b"message has been manipulated" in done.stderr, done.stderr  # the MDC caught it


def test_a_cut_file_is_refused(tmp_path):
    ciphertext = sealed(os.urandom(3 * P))
    done = gpg_decrypt(ciphertext[: len(ciphertext) - 30], KEY, tmp_path)
    assert done.returncode != 0


def test_the_wrong_key_is_refused(tmp_path):
    done = gpg_decrypt(sealed(b"secret rows"), os.urandom(32).hex(), tmp_path)
    assert done.returncode != 0 and done.stdout != b"secret rows"


def gpg_encrypt(data, passphrase, tmp_path, *options, from_file=False):
    """What the real gpg writes: from a file (definite lengths) or from stdin (partial bodies)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "pw").write_text(passphrase)
    args = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback"]
    args += ["--passphrase-file", str(tmp_path / "pw"), "--symmetric", "--cipher-algo", "AES256", *options, "-o", "-"]
    if from_file:
        (tmp_path / "plain").write_bytes(data)
        return subprocess.run([*args, str(tmp_path / "plain")], capture_output=True, check=True).stdout
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def decrypted(ciphertext, passphrase=KEY):
    out, stream = bytearray(), io.BytesIO(ciphertext)
    openpgp.decrypt(stream.read, passphrase, out.extend)
    return bytes(out)


STRATEGY = ["--s2k-mode", "3", "--s2k-digest-algo", "SHA512", "--s2k-count", "65011712", "--compress-algo", "none"]
WAL = ["--s2k-mode", "1", "--s2k-digest-algo", "SHA512", "--compress-algo", "none"]


@pytest.mark.parametrize("size", [0, 1, 8384, P + 1, 3 * P + 5])
@pytest.mark.parametrize("from_file", [False, True])
@pytest.mark.parametrize("options", [STRATEGY, WAL], ids=["strategy-s2k", "wal-s2k"])
def test_it_reads_what_gpg_writes(size, from_file, options, tmp_path):
    data = os.urandom(size)
    assert decrypted(gpg_encrypt(data, "pass phrase", tmp_path, *options, from_file=from_file), "pass phrase") == data


def test_it_reads_what_it_writes():
    data = os.urandom(2 * P + 3)
    assert decrypted(sealed(data)) == data


def test_what_gpg_compressed_is_left_to_gpg_with_what_was_read(tmp_path):
    data = b"compressible " * 100_000
    ciphertext = gpg_encrypt(data, "pass phrase", tmp_path, "--compress-algo", "zlib")
    stream = io.BytesIO(ciphertext)
    with pytest.raises(openpgp.Unsupported) as left:
        openpgp.decrypt(stream.read, "pass phrase", lambda chunk: pytest.fail("no plaintext before Unsupported"))
    assert left.value.replay + stream.read() == ciphertext


def test_a_wrong_passphrase_an_altered_and_a_cut_file_are_refused(tmp_path):
    ciphertext = gpg_encrypt(os.urandom(3 * P), "pass phrase", tmp_path, *STRATEGY)
    with pytest.raises(openpgp.BadMessage, match="wrong passphrase"):
        decrypted(ciphertext, "another")
    altered = bytearray(ciphertext)
    # Inside the encrypted MDC, which the last body piece always holds: a byte in the middle can be
    # one of gpg's partial-length octets (where it cuts its pieces varies), and the file then
    # reads as cut short, also refused, but not by the integrity check this asserts.
    altered[-10] ^= 4
    with pytest.raises(openpgp.BadMessage, match="altered"):
        decrypted(bytes(altered), "pass phrase")
    for cut in (10, len(ciphertext) // 2, len(ciphertext) - 1):
        with pytest.raises(openpgp.BadMessage):
            decrypted(ciphertext[:cut], "pass phrase")
    with pytest.raises(openpgp.BadMessage, match="follows"):
        decrypted(ciphertext + b"\x00", "pass phrase")
