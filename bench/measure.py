"""Timing a command and the peak memory of its process tree; what machine this is.

Standard library only. Peak RSS is sampled from /proc every POLL seconds: the sum over the
command's process tree (the shell, pg_dump, gpg, the portal's Python...) and the peak of the
command's own process (VmHWM, exact). Server-side work (a backend compressing for
pg_basebackup) is not in the tree and is not counted; RESULTS.md says so where it matters.
"""

import os
import platform
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POLL = 0.05


@dataclass
class Sample:
    seconds: float
    tree_rss: int  # bytes, peak of the sum over the process tree
    own_hwm: int  # bytes, the command's own process
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)
    cpu: float | None = None  # busy CPU seconds of the whole machine while it ran, every core summed


def busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy since boot, every core summed (/proc/stat).

    Machine-wide on purpose: the server's work for a command (its zstd for BASE_BACKUP, the
    backends pg_restore loads through) counts, which no process tree of the command shows."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    # Not steal (the hypervisor's, not this machine's work) nor guest (already inside user).
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time and the machine's busy CPU seconds since it was made: read() gives both."""

    def __init__(self):
        self.start, self.cpu = time.monotonic(), busy_cpu_seconds()

    def read(self):
        return time.monotonic() - self.start, busy_cpu_seconds() - self.cpu


class CommandFailed(RuntimeError):
    pass


def _children_map():
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _status_kb(pid, field_name):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid):
    """Direct children from /proc/PID/task/*/children (cheap), or None when the kernel lacks it."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            return None
        except OSError:
            pass
    return found


def tree_rss(pid):
    """Sum of VmRSS over pid and its descendants, in bytes."""
    scan = None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _status_kb(p, "VmRSS")
        kids = _children(p)
        if kids is None:  # no children files: one scan of /proc for the whole tree
            scan = scan if scan is not None else _children_map()
            kids = scan.get(p, [])
        todo.extend(kids)
    return total


class _Poller(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.hwm = pid, 0, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.hwm = max(self.hwm, _status_kb(self.pid, "VmHWM"))
            self.done.wait(POLL)


def run(argv, env=None, cwd=None, check=True) -> Sample:
    """Run argv to the end; its wall time, peak tree RSS and own peak RSS."""
    watch = Stopwatch()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = _Poller(proc.pid)
    poller.start()
    out, err = proc.communicate()
    seconds, cpu = watch.read()
    poller.done.set()
    poller.join()
    if check and proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise CommandFailed(f"{' '.join(map(str, argv))[:300]} exited {proc.returncode}: {' | '.join(tail)}")
    return Sample(seconds, poller.peak, poller.hwm, out, err, cpu=cpu)


def shell(script, env=None, cwd=None) -> Sample:
    """A pipeline written as the strategy writes it: one bash script, errors stop it."""
    return run(["bash", "-c", "set -euo pipefail\n" + script], env=env, cwd=cwd)


def median(values):
    return statistics.median(values) if values else float("nan")


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "not installed"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine(pg_bin):
    """What the numbers were measured on."""
    mem = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) * 1024
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(total / 2**30, 1),
        "kernel": platform.release(),
        "load at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
        "PostgreSQL": tool_version([str(Path(pg_bin) / "postgres"), "--version"]),
        "pgBackRest": tool_version(["pgbackrest", "version"]),
        "gpg": tool_version(["gpg", "--version"]),
        "Python": platform.python_version(),
    }


def free_bytes(path):
    return shutil.disk_usage(path).free


def dir_size(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
