"""Reading SQL that pg_dump and pg_dumpall wrote: statements, identifiers and literals.

The restore never runs these scripts as they are: it splits them into statements, recognises
the few forms it re-issues, and rebuilds each one with psycopg.sql. This module only reads.
"""

import re

# The encodings a script may declare (SET client_encoding: the dumped database's), by their
# PostgreSQL names, as Python's codecs. SQL_ASCII declares none (text); the rest have no codec.
CODECS = {
    "UTF8": "utf-8",
    "SQL_ASCII": None,
    **{f"LATIN{n}": f"iso8859-{p}" for n, p in zip(range(1, 11), (1, 2, 3, 4, 9, 10, 13, 14, 15, 16), strict=True)},
    **{f"ISO_8859_{n}": f"iso8859-{n}" for n in (5, 6, 7, 8)},
    **{f"WIN{n}": f"cp{n}" for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)},
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc-jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "EUC_KR": "euc-kr",
    "EUC_CN": "gb2312",
    "JOHAB": "johab",
    "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "big5",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
}
DECLARED = re.compile(rb"^SET client_encoding = '([A-Z0-9_]+)';$", re.M)


class NotText(ValueError):
    """A script that is not text in an encoding the portal reads: the message says why."""


def script_text(data: bytes, warnings, convert=None) -> str:
    """A script pg_restore or pg_dumpall wrote, as text. It is in the encoding it declares (a LATIN1
    database's dump is LATIN1: a comment "Département" is not UTF-8); the statements rebuilt from
    this text reach the target through the portal's session, which converts them. SQL_ASCII
    declares none: such a script is UTF-8 when it decodes so, else its bytes are read as LATIN1
    and `warnings` says so. An encoding Python has no codec for (EUC_TW, MULE_INTERNAL) is read by
    `convert(data, name)`, a server's conversion to UTF-8, when given. NotText for an encoding
    neither can read, or bytes not in the one declared."""
    declared = DECLARED.search(data[:4096])
    name = declared.group(1).decode() if declared else "UTF8"
    if name not in CODECS and convert is not None:
        return convert(data, name)
    if name not in CODECS:
        raise NotText(f"it is in {name}, an encoding the portal cannot read")
    try:
        return data.decode(CODECS[name] or "utf-8")
    except UnicodeDecodeError as e:
        if CODECS[name] is not None:
            raise NotText(f"byte {data[e.start]:#04x} at offset {e.start} is not {name} text") from None
    warnings.append(
        "the dump is SQL_ASCII and the database's names, comments or settings hold bytes that are not UTF-8: "
        "they were read as LATIN1, and may differ byte for byte in the restored database"
    )
    return data.decode("latin-1")


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
