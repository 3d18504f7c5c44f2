"""Which server-side compression for base backups: the stage alone, measured, not guessed.

Builds a throwaway cluster with the strategy-shaped dataset at full size (scale 5, and the 1/8
database beside it, as bench/run.py's cluster of (b)), vacuumed and checkpointed, without archiving,
then times pg_basebackup's tar on stdout (-X none, -c fast, no manifest) compressed by the server
(zstd level 1 with two workers, as the portal's BASE_BACKUP asks; lz4; none) and piped into gpg
encrypting only, with the strategy's s2k. Each run starts after a CHECKPOINT and a sync. Prints one
line per run, then a Markdown table of medians. What it leaves out, against section 2's stage row:
the wait for the backup's WAL to be archived (this cluster does not archive), Python, the catalog.

    python bench/base_compression.py [--scale 5] [--runs 3]
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupportal.lib.pgcluster import Cluster  # noqa: E402
from bench.compare import pg  # noqa: E402
from bench.measure import shell  # noqa: E402
from bench.setup import DB, S2K, SMALL_DB, TUNED, Workspace, load_strategy, positive  # noqa: E402

VARIANTS = {
    "server zstd, level 1, 2 workers (the portal's)": "--compress=server-zstd:level=1,workers=2",
    "server lz4, level 1": "--compress=server-lz4:1",
    "none (gpg encrypts the plain tar)": "",
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=positive(float), default=5.0, help="strategy-shaped scale (1 = about 200 MiB)")
    p.add_argument("--runs", type=positive(int), default=3)
    args = p.parse_args()
    ws = Workspace()
    try:
        template = Cluster.template(base_dir=ws.root / "pg", wal_segsize_mb=16)
        db = ws.cluster(template, **TUNED)
        for name, scale in ((DB, args.scale), (SMALL_DB, args.scale / 8)):
            load_strategy(db, name, scale)
            db.execute("VACUUM ANALYZE", dbname=name)  # no autovacuum in the middle of a round
        out = ws.root / "files" / "base.tar.gpg"
        gpg = (
            f"gpg --homedir {ws.root / 'gnupg'} --batch --yes --pinentry-mode loopback"
            f" --passphrase-file {ws.passphrase} --cipher-algo AES256 --compress-algo none {S2K} --symmetric"
        )
        read = f"{pg(db, 'pg_basebackup')} --no-manifest -Ft -D - -X none -c fast"
        seconds, sizes = {name: [] for name in VARIANTS}, {}
        for round_no in range(args.runs):
            for name, option in VARIANTS.items():
                db.execute("CHECKPOINT")
                os.sync()
                sample = shell(f"{read} {option} | {gpg} > {out}")
                seconds[name].append(sample.seconds)
                sizes[name] = out.stat().st_size
                print(f"{name}: round {round_no}, {sample.seconds:.2f} s, {sample.cpu / sample.seconds:.2f} cores busy")
                out.unlink()
        print("\n| server compression, then gpg encrypting only | median s | runs | artifact MiB |\n|---|---|---|---|")
        for name in VARIANTS:
            print(f"| {name} | {statistics.median(seconds[name]):.2f} | {args.runs} | {sizes[name] / 2**20:.0f} |")
    finally:
        ws.destroy()


if __name__ == "__main__":
    main()
