"""The shape of the code, checked: one writer of alerts, every journal action named in ACTIONS.

These read the source itself, so a new alert writer or a new action cannot slip in unseen.
"""

import ast
import re
from pathlib import Path

from backupportal import journal

ROOT = Path(__file__).resolve().parent.parent
APPS = ["backupportal", "backups", "restores", "watching"]


def sources(*apps):
    """(path, text) of every module of the apps, migrations aside."""
    for app in apps:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path, path.read_text(encoding="utf-8")


# What opens or resolves an alert: watching.alerts' two functions, the Alert model itself (a
# create or update by hand), or the module named by a dotted path.
ALERT_WRITER = re.compile(r"\b(raise_alert|resolve_alert)\b|\bwatching\.(alerts|models)\b|\bAlert\.objects\b")


def test_nothing_outside_watching_opens_or_resolves_an_alert():
    outside = [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names = [p.name for p in outside if p.name not in ("watching", "tests")]
    assert {"backupportal", "backups", "restores"} <= set(names)
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path, text in sources(*names, "scripts", "bench")
        for n, line in enumerate(text.splitlines(), 1)
        if ALERT_WRITER.search(line)
    ]
    assert found == [], "only the monitor (watching/) opens and resolves alerts; the rest records on its own rows"


def test_the_search_for_alert_writers_finds_one():
    """The search above must be able to fail: a line that raises an alert is found."""
    assert ALERT_WRITER.search('    raise_alert("backup_failed", server=server, message=text)')
    assert ALERT_WRITER.search("from watching.alerts import resolve_alert")
    assert ALERT_WRITER.search('Alert.objects.filter(pk=1).update(state="resolved")')
    assert not ALERT_WRITER.search('conditions.changed("backup_failed", server=server)')


# --- Every action the code writes is one the auditor's filter offers (journal.ACTIONS). --------


def forwarders_of(tree):
    """Functions of a module taking the action first: journal's own record(), and helpers
    handing their `action` on to journal.record (copies.record, verify._journal)."""
    return {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and f.args.args
        and f.args.args[0].arg == "action"
        and (f.name == "record" or _records(f))
    }


def imported_forwarders(tree, forwarders):
    """Forwarders another module defines and this one imports (verify uses copies.record)."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in forwarders
        for alias in node.names
        if alias.name in forwarders[node.module]
    }


def written_actions(tree, forwarders=frozenset()):
    """{action: line} of every journal.record(...) in a module and every call of a forwarder
    (`forwarders`: names this module may call), and what the source does not tell."""
    constants = module_constants(tree)
    forwarders = set(forwarders) | forwarders_of(tree)
    found, unknown = {}, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if node.args and _writes(node, forwarders):
            argument = node.args[0]
        elif _called(node) == "_append":  # journal's own first entry: _append(..., action=STARTED)
            argument = next((k.value for k in node.keywords if k.arg == "action"), None)
        else:
            continue
        values = action_values(argument, constants)
        if values is None:
            unknown.append(f"line {node.lineno}: {ast.unparse(argument)}")
        for value in values or ():
            found.setdefault(value, node.lineno)
    return found, unknown


def _called(call):
    return call.func.id if isinstance(call.func, ast.Name) else None


def _writes(call, forwarders):
    """journal.record(...), or a call of one of the module's forwarders."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id == "journal" and func.attr == "record"
    return isinstance(func, ast.Name) and func.id in forwarders


def _records(function):
    """Does the function hand its `action` parameter to journal.record?"""
    return any(
        isinstance(n, ast.Call)
        and _writes(n, set())
        and n.args
        and isinstance(n.args[0], ast.Name)
        and n.args[0].id == "action"
        for n in ast.walk(function)
    )


def module_constants(tree):
    """Module-level NAME = "text" and NAME = {...: "text"} (journal.STARTED, signals.ADMIN_ACTIONS)."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            constants[node.targets[0].id] = node.value
    return constants


def action_values(node, constants):
    """The strings an action argument can be, or None when the source does not tell."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = action_values(node.body, constants), action_values(node.orelse, constants)
        return None if a is None or b is None else a + b
    if isinstance(node, ast.Name) and node.id in constants and node.id != "action":
        return action_values(constants[node.id], constants)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        table = constants.get(node.value.id)
        if isinstance(table, ast.Dict):
            values = [action_values(v, constants) for v in table.values]
            return None if None in values else [a for v in values for a in v]
    if {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} in ({"action"}, {"action", "str"}):
        return []  # a forwarder's own parameter (journal.record's too): its callers are read instead
    return None


def all_written_actions():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): (path, ast.parse(text, str(path)))
        for path, text in sources(*APPS)
    }
    forwarders = {name: forwarders_of(tree) for name, (_, tree) in modules.items()}
    found, unknown = {}, []
    for path, tree in modules.values():
        actions, unreadable = written_actions(tree, imported_forwarders(tree, forwarders))
        found |= {a: f"{path.relative_to(ROOT)}:{line}" for a, line in actions.items()}
        unknown += [f"{path.relative_to(ROOT)} {u}" for u in unreadable]
    return found, unknown


def test_every_action_the_code_writes_is_in_journal_actions():
    found, unknown = all_written_actions()
    assert unknown == [], "write the action as a constant string, so that this test (and an auditor) can read it"
    missing = {action: where for action, where in found.items() if action not in journal.ACTIONS}
    assert missing == {}, "add these to journal.ACTIONS, with what they mean to an auditor"
    # The reading itself works: actions written in each way are found.
    assert {"backup_failed", "copy_bad", "verify_all", "admin_deleted", "journal_started", "alert_opened"} <= set(found)


def test_an_action_missing_from_journal_actions_is_caught():
    tree = ast.parse(
        "def record(action, copy, actor):\n    journal.record(action, actor=actor, obj=copy)\n"
        'journal.record("made_up_action", actor="x")\nrecord("verify" if ok else "verify_all", c, a)\n'
    )
    found, unknown = written_actions(tree)
    assert set(found) == {"made_up_action", "verify", "verify_all"} and unknown == []
    assert "made_up_action" not in journal.ACTIONS
    _, unknown = written_actions(ast.parse('journal.record(f"{kind}_done", actor="x")'))
    assert unknown == ["line 1: f'{kind}_done'"]
