"""GPG encryption of artifacts, through python-gnupg and the real gpg binary.

Symmetric AES-256 with the passphrase from BACKUP_PASSPHRASE_FILE, or public-key encryption
to GPG_RECIPIENTS (then the backup host cannot decrypt). The passphrase reaches gpg on its
stdin (--passphrase-fd 0), never in argv. Files decrypt with a plain `gpg --decrypt`.
"""

import contextvars
import copy
import ctypes
import getpass
import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import gnupg
import zstandard
from django.conf import settings

from backupportal.lib.childenv import child_env
from backups import openpgp, tarpipe
from backups.zstdframes import BoundedUnzstd


def s2k_args():
    """The strategy's key derivation (its count is GPG_S2K_COUNT): strong, and cheap once per artifact."""
    count = str(settings.GPG_S2K_COUNT)
    return ["--s2k-cipher-algo", "AES256", "--s2k-digest-algo", "SHA512", "--s2k-mode", "3", "--s2k-count", count]


# WAL segments: the passphrase is the portal's WAL data key (backups.walkeys), 256 random bits,
# so iterating the derivation adds nothing, and mode 3 costs ~0.2 s of CPU per gpg process
# whatever the count: at one gpg per segment that alone capped ingest at ~8 segments/s.
WAL_S2K_ARGS = ["--s2k-cipher-algo", "AES256", "--s2k-digest-algo", "SHA512", "--s2k-mode", "1"]
# Compression lives inside pg_dump's format (or pg_basebackup's); gpg compressing it again is
# slow for no gain, and gpg compressing is the only other form `gpg --decrypt` undoes.
NO_COMPRESSION = ["--compress-algo", "none", "-z", "0"]
CHUNK = 1024 * 1024

# A gpg the portal stops on purpose, once it has read what it needed (a dump's table of contents),
# exits non-zero, and python-gnupg warns so on stderr, where a restore that succeeds prints
# nothing else. Only that warning, and only inside stopping_on_purpose(): the same warning is
# python-gnupg's only sign of a key listing that failed.
_stopping = contextvars.ContextVar("gpg_stopped_on_purpose", default=False)


# python-gnupg logs a wrong passphrase from its own reader thread (no context reaches it): while
# any caller tries a key it expects may not open (expecting_bad_passphrase), that line is not a
# problem. The caller still gets the failure in gpg's result.
_expecting_bad_passphrase = [0]
_expecting_lock = threading.Lock()
BAD_PASSPHRASE_LINE = "potential problem: ERROR: symkey_decrypt.maybe_error 11_BAD_PASSPHRASE"


class _StoppedOnPurpose(logging.Filter):
    def filter(self, record):
        said = record.getMessage()
        if said == BAD_PASSPHRASE_LINE and _expecting_bad_passphrase[0]:
            return False
        return not (_stopping.get() and said.startswith("gpg returned a non-zero error code"))


logging.getLogger("gnupg").addFilter(_StoppedOnPurpose())


@contextmanager
def expecting_bad_passphrase():
    """gpg may fail with a wrong passphrase here, as expected: its warnings stay out of the log."""
    with _expecting_lock:
        _expecting_bad_passphrase[0] += 1
    try:
        with stopping_on_purpose():
            yield
    finally:
        with _expecting_lock:
            _expecting_bad_passphrase[0] -= 1


@contextmanager
def stopping_on_purpose():
    token = _stopping.set(True)
    try:
        yield
    finally:
        _stopping.reset(token)


class EncryptionError(Exception):
    """Misconfigured encryption, or gpg failed: the message says what to do."""


class KeyMissing(EncryptionError):
    """An artifact's key is not in the keyring: the message names the key id and what to do."""


def keyring_dir() -> Path:
    """KEYRING_DIR (0700): KEYID.passphrase or KEYID.recipients, 0600, one file per key (backups.keyring)."""
    path = Path(settings.KEYRING_DIR)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the process that started it dies.

    A worker killed mid-backup must not leave pg_dump or gpg writing on (no orphans).
    """
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class PortalGPG(gnupg.GPG):
    """python-gnupg, with children that die with the worker and large I/O buffers."""

    buffer_size = CHUNK
    pass_fds = ()  # a descriptor gpg writes to itself (Encryption.decrypt_to_fd)

    def _open_subprocess(self, args, passphrase=False):
        cmd = self.make_args(args, passphrase)
        return subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(self.env),  # never the portal's secrets (S3 keys ...): gpg gets its passphrase on a pipe
            preexec_fn=die_with_parent,
            pass_fds=self.pass_fds,
        )

    def _handle_io(self, args, fileobj_or_path, result, passphrase=None, binary=False):
        try:
            return super()._handle_io(args, fileobj_or_path, result, passphrase, binary)
        except OSError:
            # gpg died first (killed, say): python-gnupg has its exit in `result`, then raises the
            # broken pipe its writer met, which says nothing of why ("[Errno 32] Broken pipe").
            if result.returncode:
                return result
            raise


def gnupg_home() -> Path:
    home = Path(settings.GNUPGHOME or settings.VAR_DIR / "gnupg")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    return home


def read_passphrase(path=None) -> str:
    """The passphrase file must exist, be private (no group/other bits) and not be empty."""
    path = Path(path or settings.BACKUP_PASSPHRASE_FILE)
    if path.is_dir():
        raise EncryptionError(f"passphrase file {path} is a directory: give the file that holds the passphrase")
    if not path.is_file():
        raise EncryptionError(f"passphrase file {path} does not exist: create it with mode 0600, or set GPG_RECIPIENTS")
    mode = path.stat().st_mode
    if mode & 0o077:
        raise EncryptionError(f"passphrase file {path} can be read by others (mode {mode & 0o777:o}): chmod 600 {path}")
    # What stock `gpg --passphrase-file` takes, exactly: the first line, without its newline. The
    # README's restore without the portal gives gpg this very file.
    try:
        text = path.read_bytes().decode()
    except OSError as e:  # owned by another user (root's, for a worker that runs as another)
        raise EncryptionError(
            f"passphrase file {path} cannot be read by the OS user {getpass.getuser()} that runs the backups "
            f"({e.strerror}): make that user its owner (mode 0600)"
        ) from None
    except UnicodeDecodeError:
        raise EncryptionError(
            f"passphrase file {path} is not text (UTF-8): write the passphrase in it, one line"
        ) from None
    if "\0" in text:
        raise EncryptionError(
            f"passphrase file {path} holds a NUL byte: gpg would stop reading there; write the passphrase alone"
        )
    if "\r" in text:
        raise EncryptionError(
            f"passphrase file {path} has Windows line endings: stock gpg would take the CR as part of the "
            f"passphrase; convert it (dos2unix {path}) and try again"
        )
    passphrase, _, rest = text.partition("\n")
    if not passphrase and not rest.strip("\n"):
        raise EncryptionError(f"passphrase file {path} is empty: write the passphrase in it")
    if not passphrase or rest.strip("\n"):
        raise EncryptionError(
            f"passphrase file {path} holds more than its first line: stock gpg reads only that line; "
            "keep the passphrase alone on the first line"
        )
    return passphrase


class Encryption:
    """How this portal encrypts: decided once from settings, checked before any work starts."""

    key_id = ""  # the WAL data key this one encrypts with (with_data_key), else ""
    custody_key = ""  # the keyring's key id (of_key), else "": the settings' key, as before the keyring

    def __init__(self, passphrase_file=None, recipients=None):
        self.recipients = list(recipients if recipients is not None else settings.GPG_RECIPIENTS)
        self.passphrase_file = passphrase_file if passphrase_file is not None else settings.BACKUP_PASSPHRASE_FILE
        if not self.recipients and not self.passphrase_file:
            raise EncryptionError("no encryption configured: set BACKUP_PASSPHRASE_FILE (mode 0600) or GPG_RECIPIENTS")
        self.s2k_args = s2k_args()
        try:
            self.gpg = PortalGPG(gnupghome=str(gnupg_home()))
        except OSError as e:  # python-gnupg runs gpg --version first: no gpg, or one that cannot run
            raise EncryptionError(f"gpg cannot be run ({e}): install gnupg, or put gpg on the worker's PATH") from None
        self._idle, self._lock = [self.gpg], threading.Lock()
        self._data_keyed = {}  # key id -> Encryption (with_data_key)
        self._keyed = {}  # keyring key id -> Encryption (for_copy)
        if self.recipients:
            known = {k["fingerprint"] for k in self.gpg.list_keys()} | {
                uid for k in self.gpg.list_keys() for uid in k["uids"]
            }
            known |= {k["keyid"] for k in self.gpg.list_keys()}
            missing = [r for r in self.recipients if not any(r in k for k in known)]
            if missing:
                raise EncryptionError(
                    f"GPG recipient {missing[0]} has no public key in {gnupg_home()}: import it with gpg --homedir {gnupg_home()} --import"
                )
            self.passphrase = None
        else:
            self.passphrase = read_passphrase(self.passphrase_file)

    @classmethod
    def of_key(cls, key_id):
        """The keyring's key `key_id`. KeyMissing (naming it and what to do) when it is not there."""
        ring = keyring_dir()
        phrase, recipients = ring / f"{key_id}.passphrase", ring / f"{key_id}.recipients"
        if phrase.is_file():
            encryption = cls(passphrase_file=str(phrase), recipients=[])
        elif recipients.is_file():
            encryption = cls(passphrase_file="", recipients=recipients.read_text().split())
        else:
            raise KeyMissing(
                f"encryption key {key_id} is not in the keyring {ring}: put its passphrase there as "
                f"{key_id}.passphrase (or its recipients as {key_id}.recipients), mode 0600, from your key escrow"
            )
        encryption.custody_key = key_id
        return encryption

    def for_copy(self, copy):
        """What decrypts `copy`: the keyring's key its catalog row names (one per process and key),
        else this one (a copy from before the keyring, or a WAL data key already chosen)."""
        key_id = getattr(copy, "encryption_key_id", None) or ""
        if not key_id or self.key_id or key_id == self.custody_key:
            return self
        with self._lock:
            other = self._keyed.get(key_id)
        if other is None:
            other = Encryption.of_key(key_id)
            with self._lock:
                self._keyed[key_id] = other
        return other

    def with_data_key(self, key_id, secret):
        """The same gpg, with a WAL data key (backups.walkeys) as the passphrase and the salted,
        not iterated, derivation that a random 256-bit secret needs."""
        with self._lock:
            other = self._data_keyed.get(key_id)
            if other is None:
                other = copy.copy(self)
                other.recipients, other.passphrase, other.s2k_args, other.key_id = [], secret, WAL_S2K_ARGS, key_id
                other._idle, other._lock, other._data_keyed, other._keyed = [], threading.Lock(), {}, {}
                self._data_keyed[key_id] = other
        return other

    @property
    def method(self):
        return "gpg-pubkey" if self.recipients else "gpg-aes256"

    def encrypt_stream(self, source, on_data, compress_level=None):
        """Encrypt the binary stream `source`; `on_data(chunk)` gets each ciphertext chunk.

        `compress_level` (1-9) compresses inside gpg, for data that nothing compressed before
        (WAL, base backup tars): `gpg --decrypt` undoes it in the same step.
        Returns python-gnupg's result; the caller checks `.ok` / `.returncode`.
        """
        compression = ["--compress-algo", "zip", "-z", str(compress_level)] if compress_level else NO_COMPRESSION
        if isinstance(source, PipeSource):
            return self._encrypt_pipe(source, on_data, compression)
        with self._borrowed(on_data) as gpg:
            if self.recipients:
                return gpg.encrypt_file(source, self.recipients, armor=False, always_trust=True, extra_args=compression)
            return gpg.encrypt_file(
                source,
                None,
                symmetric="AES256",
                passphrase=self.passphrase,
                armor=False,
                extra_args=self.s2k_args + compression,
            )

    def _encrypt_pipe(self, source, on_data, compression):
        """gpg reading the pipe itself: no Python copy of the plaintext on its way (WAL ingest
        measured ~0.02 s of CPU a segment less). The passphrase goes on a pipe of its own."""
        args = ["-o", "-"]
        if self.recipients:
            args += ["--trust-model", "always", "--encrypt", *[arg for r in self.recipients for arg in ("-r", r)]]
        else:
            args += ["--symmetric", "--cipher-algo", "AES256", *self.s2k_args]
        try:
            gpg = self._gpg([*args, *compression], stdin=source.pipe, stdout=subprocess.PIPE)
        finally:
            source.pipe.close()  # gpg's now: a gpg that dies must not leave the writer blocked on it
        tarpipe.widen(gpg.stdout.fileno())
        while chunk := gpg.stdout.read(CHUNK):
            on_data(chunk)
        said = gpg.stderr.read().decode(errors="replace")
        gpg.stdout.close(), gpg.stderr.close()
        return PipeResult(gpg.wait(), said)

    def decrypt_stream(self, source, on_data):
        """Decrypt `source`, handing plaintext chunks to `on_data`. Result has `.ok`, `.status`.
        A copy's reader (backups.streams.VerifiedReader) is decrypted with its copy's key."""
        chosen = self.for_copy(_copy_read_by(source))
        if chosen is not self:
            return chosen.decrypt_stream(source, on_data)
        result, source = self._decrypt_here(source, on_data)
        if result is not None:
            return result
        with self._borrowed(on_data) as gpg:
            return gpg.decrypt_file(source, passphrase=self.passphrase)

    def decrypt_to_fd(self, source, fd):
        """Decrypt `source` straight into the open descriptor `fd` (a pipe into tar): gpg writes
        it itself, so gigabytes of plaintext do not pass through Python on their way."""
        chosen = self.for_copy(_copy_read_by(source))
        if chosen is not self:
            return chosen.decrypt_to_fd(source, fd)
        local = source.local_file() if hasattr(source, "local_file") else None
        if local is not None:
            with source.hashed_beside():
                return self._decrypt_file(local, fd)
        with self._borrowed(None, pass_fds=(fd,)) as gpg:
            return gpg.decrypt_file(source, passphrase=self.passphrase, output=f"/dev/fd/{fd}")

    def _decrypt_file(self, fd_in, fd_out):
        """gpg reading a local copy itself, straight into `fd_out`: the ciphertext does not pass
        through Python either (python-gnupg's feed, with the sha256 taken on the way, put 0.6-0.8 s
        on a 530 MB base backup's PITR: bench/RESULTS.md). Good only with gpg's DECRYPTION_OKAY,
        as python-gnupg judges it: exit 0 alone also passes data that was never encrypted."""
        gpg = self._gpg(
            ["--status-fd", "2", "--decrypt"], stdin=fd_in, stdout=fd_out, quiet=False
        )  # --quiet hides NO_SECKEY
        said = gpg.stderr.read().decode(errors="replace")
        gpg.stderr.close()
        return DecryptedByPath(gpg.wait(), said)

    def _gpg(self, args, stdin, stdout, quiet=True):
        """gpg started with this key and `args`, its stderr a pipe. The passphrase goes on a pipe of
        its own, never in argv; with recipients there is none (the private key is gpg's own)."""
        cmd = [self.gpg.gpgbinary, "--homedir", self.gpg.gnupghome, "--batch", "--no-tty"]
        cmd += ["--quiet"] if quiet else []
        secret_fd = None
        if not self.recipients:
            secret_fd, writer = os.pipe()
            os.write(writer, self.passphrase.encode() + b"\n")  # a pipe holds far more than a passphrase
            os.close(writer)
            cmd += ["--pinentry-mode", "loopback", "--passphrase-fd", str(secret_fd)]
        try:
            return subprocess.Popen(
                [*cmd, *args],
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=child_env(),  # never the portal's secrets (S3 keys ...)
                preexec_fn=die_with_parent,
                pass_fds=(secret_fd,) if secret_fd is not None else (),
            )
        finally:
            if secret_fd is not None:
                os.close(secret_fd)

    def _decrypt_here(self, source, write):
        """Under a WAL data key, decrypt in this thread (backups.openpgp): no gpg process for a
        segment (~20 ms of CPU with zstandard against ~48 ms for gpg and zstd, on 16 MB). Larger
        artifacts keep gpg, faster on them (0.7 s against 1.2 s on 531 MB, and in a process of its
        own). (result, source); result None when gpg must read it (a public key's, what gpg
        compressed), and source then gives back from the start what was read already."""
        if self.recipients or not self.key_id:
            return None, source
        try:
            openpgp.decrypt(source.read, self.passphrase, write)
        except openpgp.Unsupported as e:
            return None, Replayed(e.replay, source)
        except openpgp.BadMessage as e:
            return DecryptedHere(str(e)), source
        except WriteStopped as e:
            return DecryptedHere(f"zstd cannot decompress it ({e.__cause__})"), source
        return DecryptedHere(), source

    @contextmanager
    def _borrowed(self, on_data, pass_fds=()):
        """A python-gnupg object for one stream. It keeps on_data (and our pass_fds) on the object,
        so two streams at once (WAL ingest, PITR fetch pools) must not share one: each borrows
        an idle one, or a new one, and gives it back. One Encryption serves every thread."""
        with self._lock:
            gpg = self._idle.pop() if self._idle else PortalGPG(gnupghome=str(gnupg_home()))
        gpg.on_data, gpg.pass_fds = on_data, pass_fds
        try:
            yield gpg
        finally:
            gpg.on_data, gpg.pass_fds = None, ()
            with self._lock:
                self._idle.append(gpg)


def _copy_read_by(source):
    """The catalog copy a reader reads (a VerifiedReader, or a wrapper's `.reader`), else None."""
    for _ in range(3):
        if hasattr(source, "copy"):
            return source.copy
        source = getattr(source, "reader", None)
    return None


class DecryptedHere:
    """python-gnupg's result, as far as callers read it, of a decryption in this process."""

    def __init__(self, failure=""):
        self.ok, self.returncode, self.stderr = not failure, 2 if failure else 0, ""
        if "passphrase" in failure:
            self.status = f"decryption failed: {failure}"  # gpg_failure: wrong passphrase or key
        else:
            self.status = failure or "decryption ok"


class WriteStopped(Exception):
    """The plaintext could not be taken (zstd found it corrupt): its cause says why."""


class Replayed:
    """A source read again from its start: what openpgp read before handing it to gpg, then the rest."""

    def __init__(self, head, reader):
        self.head, self.reader = head, reader

    def read(self, n=CHUNK):
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.reader.read(n)


class PipeSource:
    """A pipe for Encryption.encrypt_stream that gpg reads itself (its writer is another process)."""

    def __init__(self, pipe):
        self.pipe = pipe


class PipeResult:
    """python-gnupg's result, as far as callers read it, of a gpg run on a PipeSource."""

    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr
        self.ok = returncode == 0
        self.status = "encryption ok" if self.ok else ""


class DecryptedByPath(PipeResult):
    """The same of a gpg --decrypt run with --status-fd 2 (Encryption._decrypt_file), judged as
    python-gnupg judges it, and stricter: exit 0 as well, and no BADMDC or DECRYPTION_FAILED."""

    # What `status` says when the decryption failed, first match first (python-gnupg's words).
    FAILURES = (
        ("NO_SECKEY", "no secret key"),
        ("DECRYPTION_FAILED", "decryption failed"),
        ("NODATA", "no data was provided"),
    )

    def __init__(self, returncode, stderr):
        super().__init__(returncode, stderr)
        said = {
            line.split()[1] for line in stderr.splitlines() if line.startswith("[GNUPG:] ") and len(line.split()) > 1
        }
        self.ok = self.ok and "DECRYPTION_OKAY" in said and not said & {"BADMDC", "DECRYPTION_FAILED"}
        failure = next((words for key, words in self.FAILURES if key in said), "")
        self.status = "decryption ok" if self.ok else failure


class ZstdDecrypting:
    """Decrypts what zstd compressed before gpg encrypted it (WAL since the data key): gpg's
    plaintext goes through `zstd -d` on its way to `on_data`, as `gpg -d F | zstd -d` does."""

    def __init__(self, encryption):
        self.encryption = encryption

    def decrypt_stream(self, source, on_data):
        if self.encryption.key_id and not self.encryption.recipients:
            return self._decompress_here(source, on_data)
        zstd = subprocess.Popen(
            ["zstd", "-d", "-q", "-c"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            preexec_fn=die_with_parent,
        )
        pump = threading.Thread(target=_pump, args=(zstd.stdout, on_data), daemon=True)
        pump.start()
        try:
            result = self.encryption.decrypt_stream(source, _Feeder(zstd.stdin))
        finally:
            try:
                zstd.stdin.close()
            except OSError:
                pass  # zstd gave up on bad input: its exit status says so below
            pump.join()
            zstd.wait()
        said = zstd.stderr.read().decode(errors="replace").strip().splitlines()
        zstd.stdout.close(), zstd.stderr.close()
        if zstd.returncode != 0 and result.ok:
            result.ok = False
            result.status = f"zstd cannot decompress it ({said[-1] if said else 'exit ' + str(zstd.returncode)})"
        return result

    def _decompress_here(self, source, on_data):
        """zstandard in this thread, after openpgp (or gpg) decrypted: no process per segment, and
        at most a block (128 KiB) of plaintext at a time, however well the segment compressed."""
        unzstd = BoundedUnzstd(on_data)

        def write(chunk):
            try:
                unzstd.write(chunk)
            except zstandard.ZstdError as e:
                raise WriteStopped from e

        result = self.encryption.decrypt_stream(source, write)
        if result.ok and (not unzstd.eof or unzstd.unused_data):
            result.ok, result.status = False, "zstd cannot decompress it (the data is cut short, or more follows)"
        return result


class _Feeder:
    """python-gnupg's on_data: plaintext into zstd's stdin; a closed pipe stops the writing."""

    def __init__(self, pipe):
        self.pipe, self.broken = pipe, False

    def __call__(self, chunk):
        if chunk and not self.broken:
            try:
                self.pipe.write(chunk)
            except OSError:
                self.broken = True
        return False


def _pump(pipe, on_data):
    while chunk := pipe.read(CHUNK):
        on_data(chunk)


def gpg_failure(result) -> str:
    """One line from gpg's status for an error message."""
    if (result.returncode or 0) < 0:
        return f"gpg was killed by {signal_named(-result.returncode)}"
    status = getattr(result, "status", "") or ""
    if isinstance(result, DecryptedHere) and not status.startswith("decryption failed"):
        return f"cannot decrypt: {status}"
    if "decryption failed" in status.lower() or "bad passphrase" in (result.stderr or "").lower():
        return "gpg could not decrypt: wrong passphrase or key"
    lines = [line for line in (result.stderr or "").splitlines() if line.startswith("gpg:")]
    return f"gpg failed ({status or 'exit ' + str(result.returncode)}){': ' + lines[-1] if lines else ''}"


def signal_named(number) -> str:
    """The signal as "signal 9 (SIGKILL)": the number kill sends and the name dmesg gives."""
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"
