"""WAL under a data key decompresses a block at a time: a mostly empty 16 MiB segment (after a WAL
switch) compresses to a few hundred bytes, and came back from one chunk as 16 MiB at once in
every PITR fetch thread (32 MiB of the PITR's peak with two)."""

import io
import os

import pytest
import zstandard

from backups import openpgp
from backups.crypto import Encryption, ZstdDecrypting
from backups.zstdframes import BoundedUnzstd

BLOCK = 128 << 10  # zstd's Block_Maximum_Size
SEGMENT = 16 << 20


def segments():
    """Plaintexts shaped like WAL: a switched segment (a little, then zeros), all zeros, none
    compressible, and records among zeros."""
    return {
        "switched": os.urandom(300 << 10) + bytes(SEGMENT - (300 << 10)),
        "zeros": bytes(SEGMENT),
        "random": os.urandom(4 << 20),
        "mixed": (os.urandom(1 << 14) + bytes(3 << 14)) * 256,
    }


def streamed(data, level=1, **kwargs):
    compressor = zstandard.ZstdCompressor(level=level, **kwargs).compressobj()
    return compressor.compress(data) + compressor.flush()


def decompress(compressed, step):
    pieces = []
    unzstd = BoundedUnzstd(pieces.append)
    for at in range(0, len(compressed), step):
        unzstd.write(compressed[at : at + step])
    return pieces, unzstd


@pytest.mark.parametrize("name", ["switched", "zeros", "random", "mixed"])
@pytest.mark.parametrize("step", [1, 5, 4096, 1 << 20, 64 << 20])
def test_any_chunking_gives_the_plaintext_back_a_block_at_most_at_a_time(name, step):
    data = segments()[name]
    for compressed in (streamed(data), zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)):
        if (step == 1 and len(compressed) > 4096) or (step < 4096 and len(compressed) > 1 << 20):
            continue  # a few bytes at a time through megabytes: slow, and the small ones cover it
        pieces, unzstd = decompress(compressed, step)
        assert b"".join(pieces) == data
        assert max(map(len, pieces)) <= BLOCK
        assert unzstd.eof and unzstd.unused_data == b""


def test_what_is_not_one_whole_frame_is_said_as_the_decompressor_says_it():
    data = segments()["switched"]
    compressed = streamed(data)
    pieces, unzstd = decompress(compressed[:-40], 4096)  # cut short
    assert not unzstd.eof and len(b"".join(pieces)) < len(data)
    for extra in (b"more", compressed):  # bytes after the frame, or a second frame
        for step in (3, 1 << 20):
            pieces, unzstd = decompress(compressed + extra, step)
            assert b"".join(pieces) == data and unzstd.eof and unzstd.unused_data == extra
    with pytest.raises(zstandard.ZstdError):
        decompress(b"this is no zstd frame at all", 4)


def test_a_segment_under_a_data_key_reaches_its_sink_in_pieces_of_a_block(tmp_path):
    """As the ingest seals it (zstandard, then backups.openpgp) and a PITR reads it back."""
    data = segments()["switched"]
    sealed = io.BytesIO()
    writer = openpgp.SymmetricWriter(sealed, "the WAL data key")
    writer.write(streamed(data))
    writer.close()
    encryption = Encryption(passphrase_file=_passphrase(tmp_path)).with_data_key("k1", "the WAL data key")
    pieces = []
    result = ZstdDecrypting(encryption).decrypt_stream(io.BytesIO(sealed.getvalue()), pieces.append)
    assert result.ok, result.status
    assert b"".join(pieces) == data and max(map(len, pieces)) <= BLOCK


def _passphrase(tmp_path):
    path = tmp_path / "passphrase"
    path.write_text("portal passphrase\n")
    path.chmod(0o600)
    return path
