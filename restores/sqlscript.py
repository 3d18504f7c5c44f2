"""Reading SQL that pg_dump and pg_dumpall wrote: statements, identifiers and literals.

The restore never runs these scripts as they are: it splits them into statements, recognises
the few forms it re-issues, and rebuilds each one with psycopg.sql. This module only reads.
"""

import re

# An identifier as pg_dump writes it (fmtId): bare lower-case, or double-quoted with "" inside.
IDENT = r'(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)'
# A string literal as pg_dump writes it with standard_conforming_strings on.
LITERAL = r"(?:'(?:[^']|'')*')"


def statements(script):
    """The SQL statements of a script, without comments and psql meta-commands (\\connect ...).

    Quotes are honoured, so a ';' or a newline inside a comment's text does not split it.
    """
    found, current, i, n = [], [], 0, len(script)
    at_line_start = True
    while i < n:
        ch = script[i]
        if at_line_start and not "".join(current).strip() and ch == "\\":
            i = _line_end(script, i)  # psql meta-command: \connect, \restrict, \encoding
            continue
        if ch == "-" and script.startswith("--", i):
            i = _line_end(script, i)
            continue
        if ch in "'\"":
            end = _quote_end(script, i, ch)
            current.append(script[i:end])
            i, at_line_start = end, False
            continue
        if ch == ";":
            text = "".join(current).strip()
            if text:
                found.append(text)
            current, i = [], i + 1
            continue
        current.append(ch)
        at_line_start = ch == "\n"
        i += 1
    if "".join(current).strip():
        found.append("".join(current).strip())
    return found


def _line_end(script, i):
    end = script.find("\n", i)
    return len(script) if end < 0 else end + 1


def _quote_end(script, i, quote):
    """Index just past the quoted token starting at i (a doubled quote stays inside)."""
    j = i + 1
    while True:
        j = script.find(quote, j)
        if j < 0:
            return len(script)
        if script.startswith(quote * 2, j):
            j += 2
            continue
        return j + 1


def unquote_ident(token):
    """The name an identifier token stands for: a quoted token loses its quotes, "" becomes "."""
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token


def unquote_literal(token):
    return token[1:-1].replace("''", "'")


def literal_list(text):
    """The values of a list of literals ('a', 'b'); None when the text is anything else."""
    items, pos, text = [], 0, text.strip()
    item = re.compile(rf"\s*({LITERAL})\s*(,|$)")
    while pos < len(text):
        match = item.match(text, pos)
        if match is None:
            return None
        items.append(unquote_literal(match.group(1)))
        pos = match.end()
    return items or None
