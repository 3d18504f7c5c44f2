"""The benchmark runs end to end at a tiny scale and writes its tables (structure, never speed)."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--scale", "0.02", "--pgbench-scale", "1", "--runs", "1", "--wal-segments", "3", "--wal-segsize", "1",
    "--catalog-segments", "2000", "--catalog-runs", "200", "--catalog-journal", "2000", "--page-requests", "2",
]  # fmt: skip


def work_dirs():
    return set(Path("/var/tmp").glob("bp-bench-*")) | set(Path(tempfile.gettempdir()).glob("bp-bench-scale-*"))


def bench(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_benchmark_writes_every_table_with_a_number_in_each_measured_row(tmp_path):
    out = tmp_path / "RESULTS.md"
    before = work_dirs()
    proc = bench(*TINY, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for heading in (
        "## Machine",
        "## Datasets",
        "## Targets",
        "## 1. Logical backup, strategy-shaped dataset (b)",
        "## 2. Physical backup",
        "## 3. Logical restore",
        "## 3. Logical restore of the pgbench dataset (a)",
        "## 3. PITR restore",
        "## 4. WAL archiving",
        "## 5. The portal at scale",
        "## 6. Memory of the worker",
    ):
        assert heading in text, heading
    assert "pgBackRest 2." in text and "PostgreSQL) 15" in text
    # Every method ran: no row says it failed, and each has a median time.
    assert "failed:" not in text, [line for line in text.splitlines() if "failed:" in line]
    methods = [
        line for line in text.splitlines() if re.match(r"^\| (\*\*portal\*\*|pgBackRest (full|restore|archive))", line)
    ]
    assert len(methods) >= 9
    for line in methods:
        median_s = r"^\| [^|]+ \| \d+\.\d\d \|"  # backups and restores
        wal_median_s = r"^\| [^|]+ \| \d+ \| \d+ \| \d+\.\d\d \|"  # segments, segment MB, then the median
        assert re.match(median_s, line) or re.match(wal_median_s, line), line
    targets = text.split("## Targets")[1].split("##")[0]
    assert len(re.findall(r"\*\*(PASS|MISS)\*\*", targets)) == 9
    assert work_dirs() == before, "work directory left behind"


def test_it_refuses_to_start_when_the_disk_budget_does_not_fit():
    proc = bench("--scale", "1000000", "--output", "/dev/null")
    assert proc.returncode == 2
    assert re.search(r"GiB free but this run needs up to [\d.]+ GiB", proc.stderr)
    assert proc.stderr.count("\n") == 1
