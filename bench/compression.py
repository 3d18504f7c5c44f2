"""Which compression, at what level, for logical backups: measured, not guessed.

Builds a throwaway cluster with the strategy-shaped dataset (backupportal.lib.sampledata),
then times pg_dump -Fc at several gzip levels piped into gpg AES-256 (no gpg compression),
against pg_dump -Z0 with gpg's own zlib compression. Medians of N runs; prints a Markdown table.

    python bench/compression.py [--rows-scale 1.0] [--runs 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupportal.lib import sampledata  # noqa: E402
from backupportal.lib.pgcluster import Cluster  # noqa: E402
from backupportal.lib.pgdatadir import pg_bin  # noqa: E402

S2K = "--s2k-cipher-algo AES256 --s2k-digest-algo SHA512 --s2k-mode 3 --s2k-count 65011712".split()


def pipeline(cluster, passfile, level, gpg_compress):
    """pg_dump | gpg > /dev/null-like file; returns (seconds, bytes)."""
    out = Path(tempfile.mkdtemp()) / "out.gpg"
    dump = subprocess.Popen(
        [
            str(pg_bin() / "pg_dump"),
            "-Fc",
            f"-Z{level}",
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "reliabilitymaldives",
        ],
        stdout=subprocess.PIPE,
    )
    compress = ["--compress-algo", "zlib", "-z", "6"] if gpg_compress else ["--compress-algo", "none", "-z", "0"]
    start = time.monotonic()
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(passfile),
            "--symmetric",
            "--cipher-algo",
            "AES256",
            *S2K,
            *compress,
            "-o",
            str(out),
        ],
        stdin=dump.stdout,
        check=True,
    )
    dump.wait()
    seconds = time.monotonic() - start
    size = out.stat().st_size
    out.unlink()
    return seconds, size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows-scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    s = args.rows_scale
    with Cluster.create() as cluster:
        cluster.start()
        cluster.create_database("reliabilitymaldives")
        with cluster.connect("reliabilitymaldives") as conn:
            db_size = sampledata.create_scaled(conn, s)
        passfile = Path(tempfile.mkdtemp()) / "pass"
        passfile.write_text("bench-passphrase")
        os.chmod(passfile, 0o600)
        variants = [("pg_dump -Z0, gpg zlib 6", 0, True)] + [
            (f"pg_dump -Z{z}, gpg none", z, False) for z in (6, 3, 1, 0, 3, 1)
        ]
        rows = []
        for label, level, gpg_compress in variants:
            results = [pipeline(cluster, passfile, level, gpg_compress) for _ in range(args.runs)]
            t = statistics.median(r[0] for r in results)
            size = results[0][1]
            rows.append((label, t, size))
        print(f"Database size: {db_size / 2**20:.0f} MiB; medians of {args.runs} runs\n")
        print("| method | time (s) | MB/s of DB | artifact (MiB) | ratio |")
        print("|---|---|---|---|---|")
        for label, t, size in rows:
            print(f"| {label} | {t:.2f} | {db_size / 2**20 / t:.0f} | {size / 2**20:.1f} | {db_size / size:.1f}x |")


if __name__ == "__main__":
    main()
