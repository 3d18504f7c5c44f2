"""OpenPGP symmetric encryption in this process, for WAL segments under a WAL data key.

A gpg process per segment cost the ingest ~0.04 s of CPU and two pipes of copying (measured on
a 16 MB segment, bench/RESULTS.md): at the archive rate of a busy server that was a core. What
gpg writes for `--symmetric --cipher-algo AES256 --s2k-mode 1 --s2k-digest-algo SHA512
--compress-algo none` is short to write here (RFC 4880): a symmetric-key session packet whose
salted SHA-512 of the passphrase is the AES-256 key, then an integrity-protected data packet
(AES-256 in OpenPGP's CFB mode, a SHA-1 modification detection code) holding one literal data
packet. The output is what `gpg --decrypt` reads, and is read back only by gpg: nothing here
decrypts. Only for passphrases that are random 256-bit data keys (backups.walkeys): the user's
passphrase keeps gpg's iterated derivation (crypto.s2k_args).
"""

import hashlib
import os

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

AES256 = 9  # RFC 4880 9.2
SHA512 = 10  # RFC 4880 9.4
SALTED_S2K = 1  # RFC 4880 3.7.1.2
SKESK, SEIPD, LITERAL = 3, 18, 11  # packet tags
MDC_HEADER = b"\xd3\x14"  # the modification detection code packet: tag 19, 20 bytes of SHA-1
# A packet of unknown length goes out in partial bodies of 256 KiB (RFC 4880 4.2.2.4): with 1 MiB
# pieces (and reads) glibc returned the freed buffers to the kernel and faulted them in again,
# ~0.04 s of system time per 16 MB segment; with 256 KiB ~0.005 s.
PIECE_BITS = 18
PIECE = 1 << PIECE_BITS


def definite_length(n):
    """A new-format packet length (RFC 4880 4.2.2.1-3)."""
    if n < 192:
        return bytes([n])
    if n < 8384:
        n -= 192
        return bytes([(n >> 8) + 192, n & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


PARTIAL = bytes([0xE0 | PIECE_BITS])  # the length octet of a partial body of PIECE bytes


class Packet:
    """One packet whose length is not known when it starts: partial bodies of PIECE bytes, then
    the rest with a definite length (which may be 0). `emit` takes the encoded bytes, or a view
    of them valid only during the call."""

    def __init__(self, emit, tag):
        self.emit, self.pending = emit, bytearray()
        emit(bytes([0xC0 | tag]))

    def write(self, data):
        self.pending += data
        if len(self.pending) < PIECE:
            return
        # The whole pieces go out as views of `pending`, only the rest is copied: slicing and
        # joining each piece copied every byte three more times, ~2 ms of a 16 MB segment's ~45.
        whole = len(self.pending) - len(self.pending) % PIECE
        with memoryview(self.pending) as pending:
            for start in range(0, whole, PIECE):
                self.emit(PARTIAL)
                self.emit(pending[start : start + PIECE])
            self.pending = bytearray(pending[whole:])

    def close(self):
        self.emit(definite_length(len(self.pending)) + self.pending)
        self.pending = bytearray()


class SymmetricWriter:
    """Encrypts what is written to it into `out` (anything with write(bytes)) as `gpg --symmetric`
    would with AES-256 and a salted SHA-512 derivation of `passphrase`. Call close() at the end:
    until then the output has no integrity code and `gpg --decrypt` refuses it."""

    def __init__(self, out, passphrase: str):
        salt = os.urandom(8)
        key = hashlib.sha512(salt + passphrase.encode()).digest()[:32]
        out.write(bytes([0xC0 | SKESK]) + definite_length(12) + bytes([4, AES256, SALTED_S2K, SHA512]) + salt)
        self.cipher = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
        self.mdc = hashlib.sha1()  # noqa: S324 - the MDC is SHA-1 by the standard; gpg checks it
        self.sealed = Packet(out.write, SEIPD)
        self.sealed.write(b"\x01")  # version 1, outside the encryption
        prefix = os.urandom(16)
        self._plain(prefix + prefix[-2:])  # the random prefix, its last two bytes repeated as a quick check
        self.literal = Packet(self._plain, LITERAL)
        self.literal.write(b"b\x00" + bytes(4))  # binary, no file name, no date

    def _plain(self, data):
        self.mdc.update(data)
        self.sealed.write(self.cipher.update(data))

    def write(self, data):
        self.literal.write(data)

    def close(self):
        self.literal.close()
        self.mdc.update(MDC_HEADER)
        self.sealed.write(self.cipher.update(MDC_HEADER + self.mdc.digest()) + self.cipher.finalize())
        self.sealed.close()


# --- Reading: what gpg --symmetric wrote, back in this process. ------------------------------

CIPHER_KEY_BYTES = {7: 16, 8: 24, 9: 32}  # AES-128, -192, -256
HASHES = {2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
MARKER = 10  # an obsolete packet that readers skip
COMPRESSED, PUBLIC_KEY_SESSION, SED, AEAD = 8, 1, 9, 20


class Unsupported(Exception):
    """Not a message this module reads (encrypted to a public key, compressed by gpg, AEAD ...),
    found before any plaintext was written: gpg reads it instead."""


class BadMessage(Exception):
    """The wrong key, or a file altered or cut: the message says which."""


class Stream:
    """Something with read(n) that gives fewer bytes only at its end; take() wants exactly n."""

    def take(self, n):
        data = b""
        while len(data) < n:
            more = self.read(n - len(data))
            if not more:
                raise BadMessage("the file ends inside an OpenPGP packet: it is cut short")
            data += more
        return data

    def byte(self):
        return self.take(1)[0]


class Input(Stream):
    """The ciphertext, read in pieces; what was read is kept (`replay`) until the first plaintext
    is written, so that gpg can be handed the whole message after Unsupported."""

    def __init__(self, read):
        self._read, self.pending, self.replay = read, b"", bytearray()

    def read(self, n):
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
        else:
            data = self._read(n)
        if self.replay is not None:
            self.replay += data
        return data


def new_format_length(source):
    """(length, partial) of a new-format length (RFC 4880 4.2.2)."""
    first = source.byte()
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + source.byte() + 192, False
    if first == 255:
        return int.from_bytes(source.take(4), "big"), False
    return 1 << (first & 0x1F), True


def packet_header(source):
    """(tag, length, partial) of the next packet; length None: it runs to the end of the input."""
    ctb = source.byte()
    if not ctb & 0x80:
        raise Unsupported("not an OpenPGP message")
    if ctb & 0x40:
        return (ctb & 0x3F, *new_format_length(source))
    kind = ctb & 3
    if kind == 3:
        return (ctb >> 2) & 0xF, None, False
    return (ctb >> 2) & 0xF, int.from_bytes(source.take((1, 2, 4)[kind]), "big"), False


class Body(Stream):
    """A packet's body as a stream, across its partial body lengths."""

    def __init__(self, source, length, partial):
        self.source, self.left, self.partial = source, length, partial

    def read(self, n):
        while self.left == 0 and self.partial:
            self.left, self.partial = new_format_length(self.source)
        if self.left is None:
            return self.source.read(n)
        if self.left == 0:
            return b""
        data = self.source.read(min(n, self.left))
        if not data:
            raise BadMessage("the file ends inside an OpenPGP packet: it is cut short")
        self.left -= len(data)
        return data

    def skip(self):
        while self.read(PIECE):
            pass


def s2k_key(spec, passphrase: bytes, size):
    """The key of a string-to-key specifier (RFC 4880 3.7.1): simple, salted or iterated and salted."""
    kind, algorithm = spec[0], HASHES.get(spec[1])
    if algorithm is None or kind not in (0, 1, 3):
        raise Unsupported(f"string-to-key {kind} with hash {spec[1]}")
    material = (spec[2:10] if kind else b"") + passphrase
    count = len(material)
    if kind == 3:
        coded = spec[10]
        count = max(count, (16 + (coded & 15)) << ((coded >> 4) + 6))
    key, preload = b"", 0
    block = material * (PIECE // len(material) + 1) if material else b""
    while len(key) < size:
        digest = hashlib.new(algorithm, b"\0" * preload)
        left = count
        while left > 0:
            digest.update(block[: min(left, len(block))])
            left -= len(block)
        key += digest.digest()
        preload += 1
    return key[:size]


def session_key(body: bytes, passphrase: bytes):
    """(cipher, key) of a symmetric-key session packet's body (RFC 4880 5.3)."""
    if len(body) < 4 or body[0] != 4:
        raise Unsupported("a symmetric-key session packet other than version 4")
    cipher, kind = body[1], body[2]
    spec_size = {0: 2, 1: 10, 3: 11}.get(kind)
    if cipher not in CIPHER_KEY_BYTES or spec_size is None:
        raise Unsupported(f"cipher {cipher}, string-to-key {kind}")
    key = s2k_key(body[2 : 2 + spec_size], passphrase, CIPHER_KEY_BYTES[cipher])
    wrapped = body[2 + spec_size :]
    if not wrapped:
        return cipher, key
    plain = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor().update(wrapped)
    if plain[0] not in CIPHER_KEY_BYTES or len(plain) != 1 + CIPHER_KEY_BYTES[plain[0]]:
        raise BadMessage("wrong passphrase: the session key does not decrypt")
    return plain[0], plain[1:]


class Plaintext(Stream):
    """The plaintext of an integrity-protected data packet, as a stream; its last 22 bytes (the
    modification detection code) held back and checked by finish()."""

    def __init__(self, body, cipher, key):
        self.body = body
        self.cipher = Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor()
        self.mdc = hashlib.sha1()  # noqa: S324 - the MDC is SHA-1 by the standard
        self.held, self.ended = bytearray(), False

    def _fill(self, n):
        while not self.ended and len(self.held) < n + 22:
            chunk = self.body.read(PIECE)
            if not chunk:
                self.held += self.cipher.finalize()
                self.ended = True
            else:
                self.held += self.cipher.update(chunk)

    def read(self, n):
        self._fill(n)
        out = bytes(self.held[: max(0, min(n, len(self.held) - 22))])
        del self.held[: len(out)]
        self.mdc.update(out)
        return out

    def finish(self):
        while not self.ended:  # to the end of the packet: only the integrity code may be left
            self._fill(len(self.held))
        if not self.ended or len(self.held) != 22 or self.held[:2] != MDC_HEADER:
            raise BadMessage("data follows the literal packet, or its integrity code is missing: altered or cut")
        self.mdc.update(MDC_HEADER)
        if self.mdc.digest() != bytes(self.held[2:]):
            raise BadMessage("the integrity check failed: the file was altered")


def decrypt(read, passphrase: str, write):
    """Decrypt what `gpg --symmetric` wrote (one passphrase, AES, an integrity-protected packet, one
    literal packet, no compression by gpg), read by `read(n)`, into `write(chunk)`. Raises
    Unsupported, with the input read so far in `.replay`, before writing anything, for any other
    message; BadMessage for the wrong key or a file altered or cut (plaintext may have been written
    by then, as gpg writes it too: the caller discards it)."""
    source = Input(read)
    try:
        literal = _open(source, passphrase.encode())
    except Unsupported as e:
        e.replay = bytes(source.replay)
        raise
    source.replay = None
    while chunk := literal.read(PIECE):
        write(chunk)
    if literal.read(1):
        raise BadMessage("data follows the literal packet")
    literal.plaintext.finish()
    if source.read(1):
        raise BadMessage("data follows the encrypted packet")


def _open(source, passphrase):
    """The literal packet's body (a Body, with .plaintext), its header checked and skipped."""
    tag, length, partial = packet_header(source)
    while tag == MARKER:
        Body(source, length, partial).skip()
        tag, length, partial = packet_header(source)
    if tag != SKESK or partial or length is None or length > 1024:
        raise Unsupported(f"packet {tag} where a passphrase's session packet was expected")
    cipher, key = session_key(source.take(length), passphrase)
    tag, length, partial = packet_header(source)
    if tag != SEIPD:
        raise Unsupported(f"packet {tag} after the session packet")
    body = Body(source, length, partial)
    if body.byte() != 1:
        raise Unsupported("an integrity-protected packet other than version 1")
    plaintext = Plaintext(body, cipher, key)
    prefix = plaintext.take(18)
    if prefix[14:16] != prefix[16:18]:
        raise BadMessage("wrong passphrase or key: the check bytes differ")
    tag, length, partial = packet_header(plaintext)
    if tag != LITERAL:
        raise Unsupported(f"packet {tag} inside the encrypted one (gpg compressed it)")
    literal = Body(plaintext, length, partial)
    literal.take(1)  # format
    literal.take(literal.byte() + 4)  # file name, date
    literal.plaintext = plaintext
    return literal
