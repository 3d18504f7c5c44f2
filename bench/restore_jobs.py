"""Logical restore: gpg piped into pg_restore (one job) against a decrypted scratch file with pg_restore -j 2.

    python bench/restore_jobs.py [--rows-scale 0.5] [--runs 3]

Prints a Markdown table of medians; used to choose RESTORE_JOBS.
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

GPG = ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows-scale", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    s = args.rows_scale
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    passfile = work / "pass"
    passfile.write_text("bench-passphrase")
    os.chmod(passfile, 0o600)
    with Cluster.create() as cluster:
        cluster.start()
        cluster.create_database("reliabilitymaldives")
        with cluster.connect("reliabilitymaldives") as conn:
            db_size = sampledata.create_scaled(conn, s)
        conn_args = ["-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
        enc = work / "dump.gpg"
        dump = subprocess.Popen(
            [str(pg_bin() / "pg_dump"), "-Fc", "-Z1", *conn_args, "reliabilitymaldives"], stdout=subprocess.PIPE
        )
        subprocess.run(
            GPG
            + [
                "--passphrase-file",
                str(passfile),
                "--symmetric",
                "--cipher-algo",
                "AES256",
                "--compress-algo",
                "none",
                "-o",
                str(enc),
            ],
            stdin=dump.stdout,
            check=True,
        )
        dump.wait()

        def piped(i):
            db = f"r_pipe_{i}"
            cluster.create_database(db)
            start = time.monotonic()
            dec = subprocess.Popen(
                GPG + ["--passphrase-file", str(passfile), "--decrypt", str(enc)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            subprocess.run([str(pg_bin() / "pg_restore"), *conn_args, "-d", db], stdin=dec.stdout, check=True)
            dec.wait()
            return time.monotonic() - start

        def parallel(i):
            db = f"r_j2_{i}"
            cluster.create_database(db)
            start = time.monotonic()
            plain = work / "dump"
            subprocess.run(
                GPG + ["--passphrase-file", str(passfile), "--decrypt", "-o", str(plain), str(enc)],
                check=True,
                stderr=subprocess.DEVNULL,
            )
            subprocess.run([str(pg_bin() / "pg_restore"), *conn_args, "-j", "2", "-d", db, str(plain)], check=True)
            plain.unlink()
            return time.monotonic() - start

        times = {"pipe, 1 job": [], "scratch file, -j 2": []}
        for i in range(args.runs):  # interleaved: this machine is noisy
            times["pipe, 1 job"].append(piped(i))
            times["scratch file, -j 2"].append(parallel(i))
    print(f"Database size: {db_size / 2**20:.0f} MiB; medians of {args.runs} runs\n")
    print("| method | time (s) | MB/s of DB |")
    print("|---|---|---|")
    for label, ts in times.items():
        t = statistics.median(ts)
        print(f"| {label} | {t:.2f} | {db_size / 2**20 / t:.0f} |")


if __name__ == "__main__":
    main()
