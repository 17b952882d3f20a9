"""All SQL lives behind ``gateway/store/``: no module outside it runs a statement or holds SQL text.

Outside ``gateway/store/`` a module keeps its logic and calls the store modules' functions and methods; that
is what lets the same gateway run on SQLite (the embedded default) and on PostgreSQL. The scan reads every
``gateway/**/*.py`` outside ``gateway/store/`` with :mod:`ast` and names, file:line,

- every call of ``.execute(``, ``.executemany(``, ``.executescript(`` with arguments, and of ``.query(`` on a
  database, connection or cursor (a receiver named ``db``, ``conn``, ``cursor``... or a SQL text as argument);
- every string literal (f-strings included) that is SQL: it starts with SELECT, INSERT, UPDATE, DELETE, CREATE,
  ALTER, DROP, PRAGMA, BEGIN, WITH, COMMIT, ROLLBACK, SAVEPOINT, RELEASE, REPLACE, VACUUM followed by what makes
  it a statement (``INSERT INTO``, ``UPDATE t SET``, ``CREATE TABLE``...), so that prose ("Create the key...")
  and HTTP methods ("DELETE") are not taken for SQL.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Files outside gateway/store/ allowed to hold SQL, each with the reason why.
ALLOWED: dict[str, str] = {
    "gateway/bench/baseline.py": "the library baseline the benchmark compares the gateway against: a plain "
                                 "implementation with its own SQL on purpose, measured beside the gateway's store",
}

_CALLS = ("execute", "executemany", "executescript")
#: Receivers of ``.query(`` that are a database, a connection or a cursor.
_DB_RECEIVER = re.compile(r"(?i)^_?(db|database|conn|connection|connect|cursor|cur|sqlite_db)$|_(db|conn)$")

_SQL = re.compile(r"""^\s*(?:
      SELECT\s+\S
    | INSERT\s+(?:OR\s+\w+\s+)?INTO\s
    | REPLACE\s+INTO\s
    | UPDATE\s+(?:OR\s+\w+\s+)?[\w."{}]+\s+SET\s
    | DELETE\s+FROM\s
    | CREATE\s+(?:OR\s+REPLACE\s+|UNIQUE\s+|TEMP(?:ORARY)?\s+|VIRTUAL\s+)*
          (?:TABLE|INDEX|VIEW|TRIGGER|SCHEMA|FUNCTION|SEQUENCE|EXTENSION|TYPE)\b
    | ALTER\s+(?:TABLE|INDEX|SCHEMA|SEQUENCE|VIEW|FUNCTION)\s
    | DROP\s+(?:TABLE|INDEX|VIEW|TRIGGER|SCHEMA|FUNCTION|SEQUENCE|TYPE)\s
    | PRAGMA\s+\w
    | BEGIN(?:\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION|WORK))?\s*(?:;|$)
    | WITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\([^)]*\)\s*)?AS\s*(?:NOT\s+)?(?:MATERIALIZED\s*)?\(
    | (?:COMMIT|ROLLBACK)(?:\s+(?:TRANSACTION|WORK|TO\s+\w+.*))?\s*(?:;|$)
    | SAVEPOINT\s+\w+\s*(?:;|$)
    | RELEASE\s+(?:SAVEPOINT\s+)?\w+\s*(?:;|$)
    | VACUUM\b\s*(?:;|$|INTO\s)
)""", re.VERBOSE | re.IGNORECASE)
# A statement's first word is written all in capitals or all in small letters (prose starts "Select the
# rows..."), and it needs its second part too: "update the registry set" is not SQL, "SELECT 1" and
# "select x from t" are.


@dataclass(frozen=True, order=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _receiver(node: ast.expr) -> str:
    """The name a call's receiver ends in: ``db`` for ``self.pipeline.store.db``, ``_db`` for ``self._db()``."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return ""


def _text(node: ast.AST) -> str | None:
    """The text of a string literal; an f-string's with ``{}`` where its values go."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                       for v in node.values)
    return None


def is_sql(text: str) -> bool:
    """True for a text that is (the start of) a SQL statement."""
    if not _SQL.match(text):
        return False
    first = text.split(None, 1)[0].rstrip(";")
    return first.isupper() or first.islower()


def scan_source(source: str, name: str) -> list[Finding]:
    """What breaks the rule in one module's source (``name`` is how findings name the file)."""
    tree = ast.parse(source, filename=name)
    found: set[Finding] = set()
    inside_fstring: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside_fstring.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (node.args or node.keywords):
            method = node.func.attr
            receiver = _receiver(node.func.value)
            first = _text(node.args[0]) if node.args else None
            if method in _CALLS or (method == "query" and (
                    _DB_RECEIVER.search(receiver) or (first is not None and is_sql(first)))):
                found.add(Finding(name, node.lineno, f"call {receiver or '<expr>'}.{method}(...)"))
        if id(node) in inside_fstring:
            continue  # judged as part of its f-string
        text = _text(node)
        if text is not None and is_sql(text):
            shown = " ".join(text.split())
            found.add(Finding(name, getattr(node, "lineno", 0), f"SQL text {shown[:60]!r}"))
    return sorted(found)


def scan(root: Path, allowed: dict[str, str] | None = None) -> list[Finding]:
    """Every finding in ``root/gateway/**/*.py`` outside ``gateway/store/`` and the ``allowed`` files."""
    allowed = ALLOWED if allowed is None else allowed
    package = root / "gateway"
    out: list[Finding] = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("gateway/store/") or rel in allowed:
            continue
        out.extend(scan_source(path.read_text(encoding="utf-8"), rel))
    return out


def test_no_sql_outside_the_store() -> None:
    found = scan(ROOT)
    files = sorted({f.path for f in found})
    assert not found, (f"SQL outside gateway/store/ in {len(files)} file(s) ({', '.join(files)}); move it into a "
                       "store module:\n" + "\n".join(map(str, found)))


def test_every_allowed_file_exists_and_says_why() -> None:
    for path, reason in ALLOWED.items():
        assert (ROOT / path).is_file(), path
        assert not path.startswith("gateway/store/") and len(reason.split()) >= 5, path
    # the allowed file does hold SQL (else the entry is stale and must go)
    assert scan_source((ROOT / "gateway/bench/baseline.py").read_text(encoding="utf-8"), "baseline")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return tmp_path


def test_a_planted_statement_outside_the_store_is_named_by_file_and_line(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "gateway/__init__.py": "",
        "gateway/store/__init__.py": "",
        "gateway/store/fine.py": 'def f(db):\n    return db.execute("SELECT 1").fetchone()\n',
        "gateway/console/planted.py": 'import x\n\n\ndef f(db):\n    return db.execute("SELECT 1").fetchone()\n',
    })
    found = scan(root, allowed={})
    assert [str(f) for f in found] == ["gateway/console/planted.py:5: SQL text 'SELECT 1'",
                                       "gateway/console/planted.py:5: call db.execute(...)"]
    assert scan(root, allowed={"gateway/console/planted.py": "a reason"}) == []


@pytest.mark.parametrize("source", [
    'db.execute(sql, [1])',
    'self.pipeline.store.db.executemany(statement, rows)',
    'conn.executescript(text)',
    'self._db().execute(text)',
    'rows = db.query(text, [x])',
    'cur = sqlite3.connect(p).cursor()\ncur.execute(text)',
    'x = "SELECT id FROM messages WHERE status = ?"',
    'x = f"SELECT {cols} FROM messages{where}"',
    'x = "select id from t"',
    'x = ("INSERT INTO outbox (a, b) "\n     "VALUES (?, ?)")',
    'x = "INSERT OR IGNORE INTO t VALUES (?)"',
    'x = "UPDATE messages SET status = ?"',
    'x = "DELETE FROM outbox"',
    'x = "CREATE TABLE IF NOT EXISTS t (a TEXT)"',
    'x = "CREATE UNIQUE INDEX IF NOT EXISTS i ON t(a)"',
    'x = "ALTER TABLE t ADD COLUMN b TEXT"',
    'x = "DROP TABLE t"',
    'x = "PRAGMA table_info(t)"',
    'x = "BEGIN IMMEDIATE"',
    'x = "WITH last AS (SELECT 1) SELECT * FROM last"',
    'x = "ROLLBACK"',
    'x = "SAVEPOINT unit"',
])
def test_each_kind_of_sql_is_found(source: str) -> None:
    assert scan_source(source, "m.py"), source


@pytest.mark.parametrize("source", [
    '"""Create the registry authority\'s key and self-signed certificate."""',
    'methods = ("GET", "POST", "DELETE")',
    'x = "Replace ``serve.json`` atomically"',
    'x = "update the registry set by the authority"',
    'x = "With --follow: stop after this many looks (0: never)."',
    'x = "Select the rows to show"',
    'x = "Select x from the list"',
    'x = "Pragma: no-cache"',
    'x = "-----BEGIN CERTIFICATE-----"',
    'x = text.decode("utf-8", "replace")',
    'from gateway.audit import query\npage = query.run(db, search)',
    'answer = request.query(x)',
    'task.execute()',
])
def test_prose_and_other_calls_are_not_taken_for_sql(source: str) -> None:
    assert scan_source(source, "m.py") == [], source
