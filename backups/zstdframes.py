"""zstd decompression whose output per call is bounded by a block, not by the input it is given.

zstandard's decompressobj returns everything one input chunk expands to: a WAL segment that is
mostly zeros (after a WAL switch) compresses to a few hundred bytes, and one chunk holding them
came back as the whole 16 MiB segment, once per PITR fetch thread at a time (measured: 32 MiB of
the PITR's peak in two such buffers). A zstd block decompresses to at most 128 KiB (the format's
Block_Maximum_Size), so the input is handed over one block at a time, split where the frame's
own headers say (RFC 8878, section 3.1.1); the decompressobj still does all the decoding and
says whether the frame ended, and what followed it.
"""

import zstandard

MAGIC = b"\x28\xb5\x2f\xfd"
RLE_BLOCK = 1
FCS_SIZES = (0, 2, 4, 8)  # Frame_Content_Size bytes by its flag (0 means 1 in a single segment)
DID_SIZES = (0, 1, 2, 4)


class BoundedUnzstd:
    """write(chunk) passes on what each block decompresses to; `eof` and `unused_data` as
    zstandard's decompressobj says them. Anything that does not parse as one zstd frame goes to
    the decompressobj whole, which then reports it as it always did (an error, no eof)."""

    def __init__(self, on_data):
        self.on_data = on_data
        self.unzstd = zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""  # input whose end is not yet known to be a boundary
        self.need = self.header_size  # what tells where the next boundary is, from the pending bytes
        self.parsing = True
        self.extra = b""  # input after the frame's end, given in a later piece

    @property
    def eof(self):
        return self.unzstd.eof

    @property
    def unused_data(self):
        return self.unzstd.unused_data + self.extra

    def write(self, chunk):
        if not self.parsing:
            return self.feed(chunk)
        data = self.pending + chunk if self.pending else chunk  # pending: at most part of one block
        view, at = memoryview(data), 0
        while self.parsing:
            found = self.need(view[at:])
            if found is None or at + found[0] > len(data):
                break  # more input needed to know, or to complete this piece
            size, self.need = found
            self.feed(view[at : at + size])
            at += size
        rest, self.pending = bytes(view[at:]), b""
        if self.parsing:
            self.pending = rest
        elif rest:
            self.feed(rest)

    def feed(self, data):
        if not data:
            return
        if self.unzstd.eof:  # it takes nothing after its frame: kept, as unused
            self.extra += bytes(data)
            return
        out = self.unzstd.decompress(data)
        if out:
            self.on_data(out)

    # ------------------------------------------------------------------ the frame's structure
    # Each returns (the size of the next piece, what parses the one after it) when the pending
    # bytes tell it, else None; write() moves on only once the whole piece is there.

    def header_size(self, data):
        if len(data) < 5:
            return None
        if data[:4] != MAGIC:
            return self.give_up()
        descriptor = data[4]
        single = (descriptor >> 5) & 1
        fcs = FCS_SIZES[descriptor >> 6] or single
        self.checksum = (descriptor >> 2) & 1
        return 5 + (0 if single else 1) + DID_SIZES[descriptor & 3] + fcs, self.block_size

    def block_size(self, data):
        if len(data) < 3:
            return None
        header = int.from_bytes(data[:3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        return 3 + (1 if kind == RLE_BLOCK else size), self.checksum_size if last else self.block_size

    def checksum_size(self, data):
        return 4 if self.checksum else 0, self.after_frame

    def after_frame(self, data):
        return self.give_up()  # what follows the frame: the decompressobj calls it unused

    def give_up(self):
        self.parsing = False
        return None
