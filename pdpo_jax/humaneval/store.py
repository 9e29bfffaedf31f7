"""The annotation database (SQLite): pairs, annotators, sessions, assignments and judgments.

Every state change is one `BEGIN IMMEDIATE` transaction on its own connection (WAL journal,
synchronous=FULL), so it is on disk when the request returns and two annotators working at
once are served one after the other: nobody is ever handed a slot someone else holds.

An assignment is one annotator's slot on one pair: `open` (shown, not answered), `answered`
or `released` (left open longer than the lease; its slot went back to the pool, but the pair
still counts as seen by that annotator, who never gets it again). A pair's load is its open plus
answered assignments; it is full at `per_pair`. The next pair for an annotator is the one with
the lowest load among those they have not seen, ties broken by a seeded order, so all pairs fill
evenly. `choice` is in shown positions (1, 2, 3 = tie); `swapped` records the order shown (1:
the judge's second reply was shown as 1), drawn per annotator and pair from the seed.
`seq` orders changes: the page shows the caller's open assignment changed last (an undone one
comes back first), and undo applies to the answer given last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import math
import os
import pathlib
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from pdpo_jax.humaneval.pairs import Pair, pairs_digest

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
  id INTEGER PRIMARY KEY, history INTEGER NOT NULL, first TEXT NOT NULL, second TEXT NOT NULL,
  rank INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  secret_hash TEXT PRIMARY KEY, annotator INTEGER NOT NULL REFERENCES annotators(id),
  created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  annotator INTEGER NOT NULL REFERENCES annotators(id),
  pair INTEGER NOT NULL REFERENCES pairs(id),
  swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
  status TEXT NOT NULL CHECK (status IN ('open', 'answered', 'released')),
  choice INTEGER CHECK (choice IN (1, 2, 3)),
  seq INTEGER NOT NULL,
  shown_at TEXT NOT NULL, answered_at TEXT, leased_at REAL NOT NULL,
  UNIQUE (annotator, pair));
CREATE INDEX IF NOT EXISTS assignments_by_pair ON assignments (pair, status);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator, status, seq);
"""
CHOICES = {1: "1", 2: "2", 3: "tie"}
MAX_ANNOTATORS = 1000  # an open study (sign-in by name) accepts at most this many names
_NEXT_PAIR = """
WITH load AS (SELECT pair, COUNT(*) AS n FROM assignments WHERE status != 'released' GROUP BY pair)
SELECT p.id FROM pairs p LEFT JOIN load l ON l.pair = p.id
WHERE COALESCE(l.n, 0) < ? AND p.id NOT IN (SELECT pair FROM assignments WHERE annotator = ?)
ORDER BY COALESCE(l.n, 0), p.rank LIMIT 1
"""
_ASSIGNMENT = "SELECT id, pair, swapped, status, choice, shown_at, answered_at FROM assignments"


class StoreError(ValueError):
    """A request the study refuses; `status` is the HTTP status that says why."""

    status = 400


class Forbidden(StoreError):
    status = 403


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


@dataclasses.dataclass(frozen=True)
class Annotator:
    id: int
    name: str


@dataclasses.dataclass(frozen=True)
class Assignment:
    """`choice` in shown positions (1, 2, 3 = tie); swapped: the judge's second reply shown as 1."""

    id: int
    pair: int
    swapped: bool
    status: str
    choice: int | None
    shown_at: str
    answered_at: str | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def _connect(path: pathlib.Path, write: bool) -> Iterator[sqlite3.Connection]:
    """One transaction on a fresh connection: committed when the block ends, rolled back when
    it raises. BEGIN IMMEDIATE takes the write lock up front (waits up to 10 s for it)."""
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()


class Store:
    """The study's database at `path`, created for `pairs` on first use.

    annotators: {name: token} for a study with per-annotator tokens (None: sign in by name).
    quota: pairs per annotator (default: pairs × per_pair / annotators with tokens, else all).
    lease_s: an open assignment untouched this long is released to others.
    clock: unix seconds (tests pass a fake one).
    """

    def __init__(self, path: str | os.PathLike, pairs: Sequence[Pair], *, per_pair: int = 3,
                 seed: int = 0, lease_s: float = 1800.0,
                 annotators: Mapping[str, str] | None = None, quota: int | None = None,
                 clock: Callable[[], float] = time.time):
        if per_pair < 1 or lease_s <= 0 or (quota is not None and quota < 1):
            raise StoreError(f"need --per-pair >= 1 (got {per_pair}), a lease > 0 (got "
                             f"{lease_s} s) and --quota >= 1 (got {quota})")
        self.path, self.per_pair, self.lease_s, self.clock = pathlib.Path(path), per_pair, lease_s, clock
        self.token_study = bool(annotators)
        self.seed = self._create(pairs, seed)
        if annotators:
            self._register(annotators)
        n = len(pairs)
        self.quota = min(n, quota or (math.ceil(n * per_pair / len(annotators)) if annotators else n))

    # ---- set-up

    def _create(self, pairs: Sequence[Pair], seed: int) -> int:
        """Creates the schema and the pairs (in a seeded order), or checks that the database
        was made for these pairs; returns the seed it was made with."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not an annotation database ({e}); pass a new --db") from None
        digest = pairs_digest(pairs)
        with _connect(self.path, write=True) as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if "pairs_digest" in meta:
                if meta["pairs_digest"] != digest:
                    raise StoreError(
                        f"{self.path} holds a study of other pairs (digest {meta['pairs_digest']}, "
                        f"these pairs {digest}); pass the --pairs it was made with or a new --db")
                return int(meta["seed"])
            order = list(range(len(pairs)))
            random.Random(seed).shuffle(order)
            db.executemany("INSERT INTO pairs (id, history, first, second, rank) VALUES (?, ?, ?, ?, ?)",
                           [(p.id, p.history, p.first, p.second, r) for p, r in zip(pairs, order)])
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                           [("pairs_digest", digest), ("seed", str(seed)), ("schema", "1")])
        return seed

    def _register(self, annotators: Mapping[str, str]) -> None:
        if self.per_pair > len(annotators):
            raise StoreError(f"--per-pair {self.per_pair} needs at least {self.per_pair} annotators; "
                             f"--annotators names {len(annotators)}")
        with _connect(self.path, write=True) as db:
            for name, token in annotators.items():
                db.execute("INSERT INTO annotators (name, token_hash, created) VALUES (?, ?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash",
                           (name, _hash(token), iso(self.clock())))

    # ---- sign-in

    def sign_in(self, *, name: str | None = None, token: str | None = None) -> tuple[Annotator, str]:
        """A new session for the annotator named (open study) or holding `token`; returns the
        annotator and the session secret (the cookie)."""
        if self.token_study != (token is not None) or (name is None) == (token is None):
            raise StoreError("this study signs in with a personal token" if self.token_study
                             else "this study signs in with a name")
        with _connect(self.path, write=True) as db:
            if token is not None:
                row = db.execute("SELECT id, name FROM annotators WHERE token_hash = ?",
                                 (_hash(token),)).fetchone()
                if row is None:
                    raise Forbidden("unknown token; use the link or token you were given")
            else:
                known = db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone()
                if not known and db.execute("SELECT COUNT(*) FROM annotators").fetchone()[0] \
                        >= MAX_ANNOTATORS:
                    raise Conflict(f"this study has its {MAX_ANNOTATORS} annotators; ask the "
                                   "organiser for a personal token")
                db.execute("INSERT OR IGNORE INTO annotators (name, created) VALUES (?, ?)",
                           (name, iso(self.clock())))
                row = db.execute("SELECT id, name FROM annotators WHERE name = ?", (name,)).fetchone()
            secret = secrets.token_urlsafe(24)
            db.execute("INSERT INTO sessions (secret_hash, annotator, created) VALUES (?, ?, ?)",
                       (_hash(secret), row[0], iso(self.clock())))
        return Annotator(*row), secret

    def annotator_for(self, secret: str) -> Annotator | None:
        with _connect(self.path, write=False) as db:
            row = db.execute("SELECT a.id, a.name FROM sessions s JOIN annotators a ON "
                             "a.id = s.annotator WHERE s.secret_hash = ?", (_hash(secret),)).fetchone()
        return Annotator(*row) if row else None

    def sign_out(self, secret: str) -> None:
        with _connect(self.path, write=True) as db:
            db.execute("DELETE FROM sessions WHERE secret_hash = ?", (_hash(secret),))

    # ---- work

    def current(self, who: Annotator) -> Assignment | None:
        """The caller's open assignment changed last, else a new one; None when the caller's
        quota is reached or no pair is left for them. Renews the caller's leases."""
        with _connect(self.path, write=True) as db:
            now = self.clock()
            db.execute("UPDATE assignments SET status = 'released' WHERE status = 'open' AND "
                       "leased_at < ? AND annotator != ?", (now - self.lease_s, who.id))
            db.execute("UPDATE assignments SET leased_at = ? WHERE annotator = ? AND status = 'open'",
                       (now, who.id))
            row = db.execute(f"{_ASSIGNMENT} WHERE annotator = ? AND status = 'open' "
                             "ORDER BY seq DESC LIMIT 1", (who.id,)).fetchone()
            if row is not None:
                return Assignment(*row)
            if self._answered(db, who) >= self.quota:
                return None
            pick = db.execute(_NEXT_PAIR, (self.per_pair, who.id)).fetchone()
            if pick is None:
                return None
            cur = db.execute("INSERT INTO assignments (annotator, pair, swapped, status, seq, "
                             "shown_at, leased_at) VALUES (?, ?, ?, 'open', ?, ?, ?)",
                             (who.id, pick[0], self._swapped(who, pick[0]), _next_seq(db),
                              iso(now), now))
            return Assignment(*db.execute(f"{_ASSIGNMENT} WHERE id = ?", (cur.lastrowid,)).fetchone())

    def _swapped(self, who: Annotator, pair: int) -> int:
        return int(hashlib.sha256(f"{self.seed}:{who.name}:{pair}".encode()).hexdigest(), 16) & 1

    @staticmethod
    def _answered(db: sqlite3.Connection, who: Annotator) -> int:
        return db.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ? AND "
                          "status = 'answered'", (who.id,)).fetchone()[0]

    def assignment(self, who: Annotator, assignment_id: int) -> Assignment:
        """One of the caller's assignments (NotFound for anyone else's)."""
        with _connect(self.path, write=False) as db:
            return Assignment(*_own(db, who, assignment_id))

    def submit(self, who: Annotator, assignment_id: int, choice: int) -> str:
        """Records `choice` (1, 2, 3 = tie, shown positions): 'saved', or 'unchanged' when the
        same answer is already there. A different answer to an answered slot is a Conflict."""
        with _connect(self.path, write=True) as db:
            row = Assignment(*_own(db, who, assignment_id))
            if row.status == "answered":
                if row.choice == choice:
                    return "unchanged"
                raise Conflict(f"assignment {row.id} is already answered with "
                               f"{CHOICES[row.choice]!r}; undo it first to change the answer")
            if row.status == "released" and self._load(db, row.pair) >= self.per_pair:
                raise Conflict(f"assignment {row.id} was idle over {self.lease_s / 60:.0f} min and "
                               "its pair went to someone else; reload for your next pair")
            now = self.clock()
            db.execute("UPDATE assignments SET status = 'answered', choice = ?, answered_at = ?, "
                       "leased_at = ?, seq = ? WHERE id = ?",
                       (choice, iso(now), now, _next_seq(db), row.id))
            return "saved"

    def undo(self, who: Annotator, assignment_id: int) -> str:
        """Reopens the caller's last answer ('undone'); 'unchanged' when it is already open."""
        with _connect(self.path, write=True) as db:
            row = Assignment(*_own(db, who, assignment_id))
            if row.status == "open":
                return "unchanged"
            last = self._last_answered(db, who)
            if row.status != "answered" or last != row.id:
                raise Conflict(f"assignment {row.id} is not your last answer "
                               f"({'none' if last is None else f'assignment {last}'}); only the "
                               "last answer can be undone")
            now = self.clock()
            db.execute("UPDATE assignments SET status = 'open', choice = NULL, answered_at = NULL, "
                       "leased_at = ?, seq = ? WHERE id = ?", (now, _next_seq(db), row.id))
            return "undone"

    @staticmethod
    def _last_answered(db: sqlite3.Connection, who: Annotator) -> int | None:
        row = db.execute("SELECT id FROM assignments WHERE annotator = ? AND status = 'answered' "
                         "ORDER BY seq DESC LIMIT 1", (who.id,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _load(db: sqlite3.Connection, pair: int) -> int:
        return db.execute("SELECT COUNT(*) FROM assignments WHERE pair = ? AND status != 'released'",
                          (pair,)).fetchone()[0]

    def progress(self, who: Annotator) -> tuple[int, int, int | None]:
        """(answered, quota, the assignment undo would reopen)."""
        with _connect(self.path, write=False) as db:
            return self._answered(db, who), self.quota, self._last_answered(db, who)

    # ---- admin

    def annotator_progress(self) -> list[dict]:
        with _connect(self.path, write=False) as db:
            rows = db.execute(
                "SELECT a.name, SUM(s.status = 'answered'), SUM(s.status = 'open'), "
                "SUM(s.status = 'released'), MAX(s.answered_at) FROM annotators a "
                "LEFT JOIN assignments s ON s.annotator = a.id GROUP BY a.id ORDER BY a.name").fetchall()
        return [{"annotator": name, "answered": answered or 0, "open": open_ or 0,
                 "released": released or 0, "quota": self.quota, "last_answer": last}
                for name, answered, open_, released, last in rows]

    def pair_progress(self) -> list[dict]:
        with _connect(self.path, write=False) as db:
            rows = db.execute(
                "SELECT p.id, SUM(s.status = 'answered'), SUM(s.status = 'open') FROM pairs p "
                "LEFT JOIN assignments s ON s.pair = p.id GROUP BY p.id ORDER BY p.id").fetchall()
        return [{"pair": pair, "answered": answered or 0, "open": open_ or 0,
                 "per_pair": self.per_pair} for pair, answered, open_ in rows]

    def judgments(self) -> list[dict]:
        return read_judgments(self.path)


def _own(db: sqlite3.Connection, who: Annotator, assignment_id: int) -> tuple:
    row = db.execute(f"{_ASSIGNMENT} WHERE id = ? AND annotator = ?",
                     (assignment_id, who.id)).fetchone()
    if row is None:
        raise NotFound(f"you have no assignment {assignment_id}; reload the task page")
    return row


def _next_seq(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM assignments").fetchone()[0]


EXPORT_FIELDS = ("annotator", "pair", "history", "shown_1", "shown_2", "choice", "winner",
                 "shown_at", "answered_at", "assignment")


def read_judgments(path: str | os.PathLike) -> list[dict]:
    """Every answered assignment, oldest answer first: who, which pair, which model was shown
    as 1 and 2, the choice ('1', '2', 'tie'), the winning model (or 'tie') and the times."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no annotation database there; pass the --db that serve used")
    with _connect(path, write=False) as db:
        rows = db.execute(
            "SELECT a.name, s.pair, p.history, p.first, p.second, s.swapped, s.choice, s.shown_at, "
            "s.answered_at, s.id FROM assignments s JOIN annotators a ON a.id = s.annotator "
            "JOIN pairs p ON p.id = s.pair WHERE s.status = 'answered' ORDER BY s.seq").fetchall()
    out = []
    for name, pair, history, first, second, swapped, choice, shown_at, answered_at, aid in rows:
        shown = (second, first) if swapped else (first, second)
        winner = "tie" if choice == 3 else shown[choice - 1]
        out.append(dict(zip(EXPORT_FIELDS, (name, pair, history, *shown, CHOICES[choice], winner,
                                            shown_at, answered_at, aid))))
    return out
