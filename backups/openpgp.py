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


class Packet:
    """One packet whose length is not known when it starts: partial bodies of PIECE bytes, then
    the rest with a definite length (which may be 0). `emit` takes the encoded bytes."""

    def __init__(self, emit, tag):
        self.emit, self.pending = emit, bytearray()
        emit(bytes([0xC0 | tag]))

    def write(self, data):
        self.pending += data
        while len(self.pending) >= PIECE:
            self.emit(bytes([0xE0 | PIECE_BITS]) + self.pending[:PIECE])
            del self.pending[:PIECE]

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
