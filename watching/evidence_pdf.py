"""The evidence pack's PDF summary (fpdf2): the figures of watching/evidence.py, as sentences and tables.

fpdf2's built-in Helvetica knows Latin-1 only: text is folded to it (a name with other letters
prints with ? for them; the CSV beside the PDF keeps every character).
"""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from fpdf import FPDF

from watching import evidence_rows

FONT = "Helvetica"
LISTED = 200  # rows of a table; the journal extract holds every entry
DIFFER_LISTED = 20  # rows that differ from the journal named on the first page; the JSON holds all
MISSED_LISTED = 60  # days without a good logical backup named per server; past it, how many more


def latin(text):
    return str(text).replace("\u2014", "-").replace("\u2013", "-").encode("latin-1", "replace").decode("latin-1")


def when(value):
    return f"{timezone.localtime(value):%Y-%m-%d %H:%M}" if value else "-"


def span(seconds):
    """1 h 5 min, 12 min, 40 s: a duration as an auditor reads it."""
    if seconds is None:
        return "-"
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


class Summary(FPDF):
    def __init__(self, title):
        super().__init__(orientation="P", unit="mm", format="A4")
        self.title_text = title
        self.set_auto_page_break(auto=True, margin=15)
        self.set_title(latin(title))
        self.set_creator("backupportal")

    def footer(self):
        self.set_y(-12)
        self.set_font(FONT, size=8)
        self.cell(0, 8, latin(f"{self.title_text} - page {self.page_no()}/{{nb}}"), align="C")

    def heading(self, text):
        self.ln(3)
        self.set_font(FONT, style="B", size=13)
        self.multi_cell(0, 7, latin(text), new_x="LMARGIN", new_y="NEXT")
        self.set_font(FONT, size=9)

    def line(self, text):
        self.multi_cell(0, 5, latin(text), new_x="LMARGIN", new_y="NEXT")

    def rows(self, header, rows, widths):
        """A table; past LISTED rows, a line says how many more the CSV holds."""
        if not rows:
            self.line("None in the period.")
            return
        with self.table(col_widths=widths, text_align="LEFT", line_height=4.5, first_row_as_headings=True) as table:
            for row in [header, *rows[:LISTED]]:
                cells = table.row()
                for value in row:
                    cells.cell(latin(value))
        if len(rows) > LISTED:
            self.line(f"... and {len(rows) - LISTED} more (see journal.csv).")


def render(figures, journal_check, signer):
    """The summary as PDF bytes."""
    period = figures["period"]
    pdf = Summary(f"backupportal evidence pack {period}")
    pdf.add_page()
    pdf.set_font(FONT, style="B", size=16)
    pdf.line(f"Evidence pack: {period}")
    pdf.set_font(FONT, size=9)
    pdf.line(f"Portal: {settings.SITE_URL}. Made {when(timezone.now())} ({settings.TIME_ZONE}).")
    pdf.line(f"Signed with the portal's signing key {signer}.")
    pdf.line(f"Journal chain check: {'intact' if journal_check['ok'] else 'NOT INTACT'}: {journal_check['message']}")
    _rows(pdf, journal_check["rows"])
    _backups(pdf, figures["servers"])
    _objectives(pdf, figures["servers"])
    _tests(pdf, figures["restore_tests"], figures["drills"])
    _alerts(pdf, figures["alerts"])
    _maintenance(pdf, figures["maintenance"])
    _journal_facts(pdf, figures["key_rotations"], figures["approvals"])
    return bytes(pdf.output())


def _rows(pdf, rows):
    """First page: the rows below that the journal contradicts, else that all agree."""
    counted = evidence_rows.counted(rows["checked"])
    if not rows["differ"]:
        pdf.line(f"Rows against the journal: as the journal recorded them ({counted}).")
        return
    pdf.line(f"Rows against the journal: {len(rows['differ'])} differ from the journal ({counted} checked):")
    for row in rows["differ"][:DIFFER_LISTED]:
        pdf.line(f"- {row['row']} differs from the journal: {row['problem']}")
    if len(rows["differ"]) > DIFFER_LISTED:
        pdf.line(f"- and {len(rows['differ']) - DIFFER_LISTED} more (listed in journal-check.json)")


def _backups(pdf, servers):
    pdf.heading("Backups taken and missed, per server")
    for s in servers:
        taken, failed = s["taken"], s["failed"]
        pdf.line(
            f"{s['name']}: logical backups taken {taken['logical']}, failed {failed['logical']}; "
            f"base backups taken {taken['base']}, failed {failed['base']}; "
            f"incrementals taken {taken['incremental']}, failed {failed['incremental']}; "
            f"days without a good logical backup {len(s['missed_days'])} of {s['days_watched']}."
        )
        if s["missed_days"]:
            shown, rest = s["missed_days"][:MISSED_LISTED], len(s["missed_days"]) - MISSED_LISTED
            more = f"; and {rest} more (not listed here)" if rest > 0 else ""
            pdf.line("  missed: " + ", ".join(f"{d:%Y-%m-%d}" for d in shown) + more)
    if not servers:
        pdf.line("No server is registered.")


def _objectives(pdf, servers):
    pdf.heading("RPO and RTO achieved against objectives")
    for s in servers:
        rpo, rto = s["rpo"], s["rto"]
        if rpo["hours"]:
            pdf.line(
                f"{s['name']}: RPO worst {span(rpo['worst'])} against an objective of {span(rpo['objective_s'])}; "
                f"hours over the objective {rpo['over']} of {rpo['hours']} measured."
            )
        else:
            pdf.line(f"{s['name']}: RPO not measured in the period (archiving {rpo['archiving']}).")
        if rto["tests"]:
            pdf.line(
                f"{s['name']}: RTO longest {span(rto['longest_s'])}, newest {span(rto['newest_s'])} against an "
                f"objective of {span(rto['objective_s'])}; passed restore tests over the objective {rto['over']} "
                f"of {rto['tests']}."
            )
        else:
            pdf.line(f"{s['name']}: RTO not measured: no restore test passed in the period.")


def _tests(pdf, tests, drills):
    passed = sum(1 for t in tests if t["status"] == "passed")
    failed = sum(1 for t in tests if t["status"] == "failed")
    pdf.heading(f"Restore tests: {passed} passed, {failed} failed")
    pdf.rows(
        ["#", "server", "kind", "started", "outcome", "duration", "error"],
        [
            [
                t["id"],
                t["server"],
                t["kind"],
                when(t["started_at"]),
                t["status"],
                span(t["duration_s"]),
                t["error"][:80],
            ]
            for t in tests
        ],
        [8, 22, 16, 28, 16, 18, 82],
    )
    pdf.heading(f"DR drills: {len(drills)}")
    rows = []
    for d in drills:
        met = "; ".join(
            f"{m['label']} {span(m['measured'])} of {span(m['objective'])}: "
            + ("not recorded" if m["met"] is None else "met" if m["met"] else "MISSED")
            for m in d["recovery"]
        )
        rows.append([d["id"], d["title"], d["server"] or "-", when(d["started_at"]), d["status"], met])
    pdf.rows(
        ["#", "drill", "server", "declared", "status", "recovery against objectives"], rows, [8, 36, 20, 28, 24, 74]
    )


def _alerts(pdf, alerts):
    resolved = [a for a in alerts if a["resolved_at"]]
    pdf.heading(f"Alerts opened: {len(alerts)} ({len(resolved)} resolved, {len(alerts) - len(resolved)} still open)")
    pdf.rows(
        ["#", "condition", "about", "opened", "resolved", "open for"],
        [
            [a["id"], a["condition"], a["subject"], when(a["opened_at"]), when(a["resolved_at"]), span(a["open_for"])]
            for a in alerts
        ],
        [10, 50, 36, 30, 30, 34],
    )


def _maintenance(pdf, tasks):
    done = sum(1 for t in tasks if t["outcome"].startswith("done"))
    overdue = sum(1 for t in tasks if t["outcome"].startswith("overdue"))
    pdf.heading(f"Maintenance tasks due: {len(tasks)} ({done} done, {overdue} overdue)")
    pdf.rows(
        ["#", "task", "due", "completed", "by", "outcome"],
        [
            [t["id"], t["task"], f"{t['due_on']:%Y-%m-%d}", when(t["completed_at"]), t["completed_by"], t["outcome"]]
            for t in tasks
        ],
        [10, 70, 22, 30, 22, 36],
    )


def _journal_facts(pdf, rotations, approvals):
    pdf.heading(f"Key rotations: {len(rotations)}")
    pdf.rows(
        ["entry", "at", "by", "what"],
        [[e["id"], when(e["at"]), e["actor"], e["object"]] for e in rotations],
        [14, 30, 40, 106],
    )
    pdf.heading(f"Approvals of restores and destructive changes: {len(approvals)}")
    pdf.rows(
        ["entry", "at", "decision", "by", "what"],
        [[e["id"], when(e["at"]), e["action"], e["actor"], e["object"]] for e in approvals],
        [14, 30, 34, 30, 82],
    )
