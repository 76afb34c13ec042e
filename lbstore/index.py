"""The store's SQLite index: every SQL statement of lbstore lives here.

The index is `STORE/index.sqlite` in WAL mode (readers never wait for the writer) with foreign
keys on. Its schema grows by `sqlite_utils.Migrations`, never by hand. Each logical unit (begin a
point, commit a point, recover) runs inside one `db.atomic()` transaction, so a crash leaves
either the old state or the new one.

Checksums are kept compactly: one row per (point, disk, chunk of guest clusters) holding the
algorithm's name and two blobs, so a restore point costs O(disks) rows, never one per cluster.
What the blobs hold is lbstore.checksums' business (the one row codec): this module stores and
returns `ChecksumRow`s as they are.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sqlite_utils import Database

from lbstore.checksums import DIGEST_SIZE, ChecksumRow
from lbstore.errors import IndexDamagedError
from lbstore.model import utc_iso

INDEX_NAME = "index.sqlite"


class IndexDb:
    """The index's connection: `execute`, `query`, `atomic` and `close`, as sqlite_utils'
    `Database` offers them, over a connection in autocommit mode.

    Why not `Database` itself: importing sqlite_utils (dateutil, pluggy...) costs several
    times what a `list` spends on its SQL. It is loaded only to apply pending migrations.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(
        self, sql: str, parameters: Sequence[Any] | dict[str, Any] | None = None
    ) -> sqlite3.Cursor:
        """Run one statement (committed at once unless inside `atomic`)."""
        return self.conn.execute(sql, parameters if parameters is not None else ())

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The rows of a SELECT as dicts keyed by column name."""
        cursor = self.conn.execute(sql, params if params is not None else ())
        keys = [column[0] for column in cursor.description or ()]
        return (dict(zip(keys, row, strict=True)) for row in cursor)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[IndexDb]:
        """One transaction (a savepoint when nested): committed on success, else rolled back."""
        if self.conn.in_transaction:
            self.conn.execute("SAVEPOINT lbstore_atomic")
            try:
                yield self
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK TO SAVEPOINT lbstore_atomic")
                    self.conn.execute("RELEASE SAVEPOINT lbstore_atomic")
                raise
            self.conn.execute("RELEASE SAVEPOINT lbstore_atomic")
            return
        self.conn.execute("BEGIN")
        try:
            yield self
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


@dataclass(frozen=True)
class AppliedMigration:
    """A row of sqlite_utils' `_sqlite_migrations` table for this set."""

    name: str
    applied_at: str


class MigrationSet:
    """The schema's steps, registered like `sqlite_utils.Migrations` (`@migrations(name=...)`)
    and applied by it; this registry only answers "what is pending" without loading it."""

    table = "_sqlite_migrations"  # sqlite_utils.Migrations.migrations_table

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[tuple[str, Callable[[Database], None], bool]] = []

    def __call__(
        self, *, name: str | None = None, transactional: bool = True
    ) -> Callable[[Callable[[Database], None]], Callable[[Database], None]]:
        """Register a migration step (the decorator of sqlite_utils.Migrations)."""

        def register(step: Callable[[Database], None]) -> Callable[[Database], None]:
            step_name = name or step.__name__
            if any(known == step_name for known, _, _ in self.steps):
                raise ValueError(f"migration {step_name!r} is registered twice")
            self.steps.append((step_name, step, transactional))
            return step

        return register

    def applied(self, db: IndexDb) -> list[AppliedMigration]:
        """This set's applied migrations, in the order they were applied."""
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [self.table]
        ).fetchone()
        if exists is None:
            return []
        rows = db.execute(
            f"SELECT name, applied_at FROM {self.table} WHERE migration_set = ? ORDER BY rowid",
            [self.name],
        )
        return [AppliedMigration(name, applied_at) for name, applied_at in rows]

    def pending(self, db: IndexDb) -> list[str]:
        """Names of the registered migrations not applied yet."""
        done = {migration.name for migration in self.applied(db)}
        return [name for name, _, _ in self.steps if name not in done]

    def apply(self, db: IndexDb) -> None:
        """Apply the pending migrations with sqlite_utils.Migrations (loaded only then)."""
        if not self.pending(db):
            return
        from sqlite_utils import Database, Migrations

        runner = Migrations(self.name)
        for name, step, transactional in self.steps:
            runner(name=name, transactional=transactional)(step)
        runner.apply(Database(db.conn))


migrations = MigrationSet("lbstore")


@migrations(name="0001_initial")
def _initial_schema(db: Database) -> None:
    """Store identity, VMs, disks, restore points, their files, checksums and events."""
    for statement in _INITIAL_SCHEMA.split(";\n"):
        if statement.strip():
            db.execute(statement)


_INITIAL_SCHEMA = """
CREATE TABLE store (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE vms (
    name TEXT PRIMARY KEY,
    uuid TEXT,
    machine TEXT,
    memory_mib INTEGER,
    cpus INTEGER,
    disks TEXT,
    nics TEXT,
    libvirt_xml TEXT,
    definition TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE disks (
    vm TEXT NOT NULL REFERENCES vms(name),
    name TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    cluster_size INTEGER NOT NULL,
    PRIMARY KEY (vm, name)
);
CREATE TABLE restore_points (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL REFERENCES vms(name),
    created TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('full', 'incremental', 'resync', 'merged')),
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    definition TEXT,
    started TEXT NOT NULL,
    committed TEXT
);
CREATE INDEX restore_points_by_vm ON restore_points (vm, state, created, id);
CREATE TABLE point_disks (
    point_id INTEGER NOT NULL REFERENCES restore_points(id),
    disk TEXT NOT NULL,
    file TEXT NOT NULL UNIQUE,
    backing_point_id INTEGER,
    mode TEXT NOT NULL CHECK (mode IN ('full', 'incremental', 'compare', 'resync')),
    virtual_size INTEGER NOT NULL,
    cluster_size INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    PRIMARY KEY (point_id, disk),
    FOREIGN KEY (backing_point_id, disk) REFERENCES point_disks (point_id, disk)
);
CREATE INDEX point_disks_by_backing ON point_disks (backing_point_id, disk);
CREATE TABLE checksums (
    point_id INTEGER NOT NULL,
    disk TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    algorithm TEXT NOT NULL,
    cluster_runs BLOB NOT NULL,
    digests BLOB NOT NULL,
    PRIMARY KEY (point_id, disk, chunk),
    FOREIGN KEY (point_id, disk) REFERENCES point_disks (point_id, disk) ON DELETE CASCADE
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    vm TEXT,
    point_id INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    details TEXT
);
CREATE INDEX events_by_vm ON events (vm, id)
"""


@migrations(name="0002_merge_journal")
def _merge_journal(db: Database) -> None:
    """The merge journal: one row per restore point being removed, with each disk's plan and
    step, so that an interrupted merge can be finished (lbstore.merge)."""
    db.execute(
        "CREATE TABLE merges (point_id INTEGER PRIMARY KEY, vm TEXT NOT NULL, "
        "started TEXT NOT NULL, step TEXT NOT NULL CHECK (step IN ('files', 'indexed')), "
        "plan TEXT NOT NULL)"
    )


@migrations(name="0003_retired_checksums")
def _retired_checksums(db: Database) -> None:
    """Checksum rows of points merged away while a reader held them: that reader's checks
    still need them (lbstore.merge); they go when no reader holds the point any more."""
    db.execute(
        "CREATE TABLE retired_checksums (point_id INTEGER NOT NULL, vm TEXT NOT NULL, "
        "disk TEXT NOT NULL, chunk INTEGER NOT NULL, algorithm TEXT NOT NULL, "
        "cluster_runs BLOB NOT NULL, digests BLOB NOT NULL, PRIMARY KEY (point_id, disk, chunk))"
    )


@migrations(name="0004_zero_runs")
def _zero_runs(db: Database) -> None:
    """Each file's own zero clusters (lbstore.checksums' zero-run blob). A file without a row
    was committed before this table existed: its zero clusters are not known."""
    db.execute(
        "CREATE TABLE zero_runs (point_id INTEGER NOT NULL, disk TEXT NOT NULL, "
        "runs BLOB NOT NULL, PRIMARY KEY (point_id, disk), FOREIGN KEY (point_id, disk) "
        "REFERENCES point_disks (point_id, disk) ON DELETE CASCADE)"
    )


# --- the index ----------------------------------------------------------------------------------


def _now() -> str:
    return utc_iso(datetime.now(UTC))


BUSY_TIMEOUT = 30.0
"""Seconds a statement waits for another connection's lock before failing."""


def _connect(path: Path, *, readonly: bool, immutable: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are opened only by `db.atomic()`.

    Usable from any thread (SQLite is built serialized, sqlite3.threadsafety 3): a restore
    reads checksum rows from its walking thread and a mount from its FUSE threads, through
    the one Store they opened (the Store serialises those reads).
    """
    if readonly:
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        uri = f"{path.resolve().as_uri()}?{flags}"
        return sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False
        )
    return sqlite3.connect(
        str(path), isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False
    )


_DAMAGE_WORDS = ("malformed", "not a database", "no such table")
"""Messages of SQLite errors that mean the index file itself is damaged, not the request."""

C = TypeVar("C")


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """True for SQLITE_CORRUPT / SQLITE_NOTADB and a schema gone (an emptied index)."""
    if type(exc) is sqlite3.DatabaseError:
        return True
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc) for word in _DAMAGE_WORDS
    )


def _damage_to_store_error(path: Path, function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one Index method: a damaged index becomes IndexDamagedError (one line), not a
    traceback; every other SQLite error is left alone (a full disk, a bug)."""

    def convert(exc: sqlite3.DatabaseError) -> IndexDamagedError:
        return IndexDamagedError(path, f"the index is damaged ({exc})")

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def generator(self: Index, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from function(self, *args, **kwargs)
            except sqlite3.DatabaseError as exc:
                if _is_damage(exc):
                    raise convert(exc) from exc
                raise

        return generator

    @functools.wraps(function)
    def wrapper(self: Index, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise convert(exc) from exc
            raise

    return wrapper


def _converting_damage(cls: type[C]) -> type[C]:
    """Apply _damage_to_store_error to every public method of the class."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, _damage_to_store_error(Path(INDEX_NAME), member))
    return cls


def probe_index(path: Path, *, thorough: bool = False) -> str:
    """The state of an index file without changing it: "missing", "empty" (no bytes, or no
    schema), "damaged" (SQLite says it is corrupt or no database) or "ok". An index SQLite
    cannot open for other reasons is "ok" here: opening it says why. OSError from looking at
    the file (permissions) is raised.

    `thorough` also reads every page (PRAGMA quick_check): `check` and its repair do, since a
    damaged page of a table the cheap probe does not touch is found only so."""
    if not path.exists():  # OSError (a folder the caller may not search) is the caller's
        return "missing"
    if path.stat().st_size == 0 and not path.with_name(path.name + "-wal").exists():
        return "empty"
    for immutable in (False, True):  # immutable: a WAL index on a read-only filesystem
        try:
            return _probe_schema(path, immutable, thorough)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                return "damaged"
    return "ok"


def _probe_schema(path: Path, immutable: bool, thorough: bool) -> str:
    conn = _connect(path, readonly=True, immutable=immutable)
    try:
        if thorough:
            verdict = conn.execute("PRAGMA quick_check(1)").fetchone()
            if verdict is None or verdict[0] != "ok":
                return "damaged"
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not {"store", "restore_points", "point_disks"} <= tables:
            return "empty"
        conn.execute("SELECT COUNT(*) FROM restore_points").fetchone()
        conn.execute("SELECT COUNT(*) FROM point_disks").fetchone()
        return "ok"
    finally:
        conn.close()


@_converting_damage
class Index:
    """The SQLite index of one store. Methods are named for what they mean, not for SQL.

    Every public method turns a damaged index (a corrupted page, a file that is no database)
    into IndexDamagedError, so each command says so in one line.
    """

    def __init__(self, db: IndexDb, *, readonly: bool) -> None:
        self.db = db
        self.readonly = readonly

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path) -> Index:
        """Create (or upgrade) the index at `path` and give the store its identity."""
        index = cls.open(path, readonly=False)
        with index.db.atomic():
            index.db.execute(
                "INSERT OR IGNORE INTO store (key, value) VALUES ('id', ?), ('created', ?)",
                [str(uuid.uuid4()), _now()],
            )
        return index

    @classmethod
    def open(
        cls, path: Path, *, readonly: bool, immutable: bool = False, migrate: bool = True
    ) -> Index:
        """Open the index; the writer (`migrate`) sets WAL mode and applies pending migrations.

        `readonly` opens a read-only connection (`immutable` for a read-only filesystem); readers
        that may log events open read-write with `migrate=False`.
        """
        conn = _connect(path, readonly=readonly, immutable=immutable)
        db = IndexDb(conn)
        db.execute("PRAGMA foreign_keys = ON")
        if not readonly and migrate:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            migrations.apply(db)
        return cls(db, readonly=readonly)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def schema_is_current(self) -> bool:
        """True when every migration has been applied (a reader cannot apply them)."""
        return not migrations.pending(self.db)

    def identity(self) -> dict[str, str]:
        """The store's identity: its id (a UUID) and creation time."""
        return {row[0]: row[1] for row in self.db.execute("SELECT key, value FROM store")}

    # --- restore points -------------------------------------------------------------------------

    def begin_point(
        self,
        vm: str,
        created: datetime,
        *,
        above: int = 0,
        reserve: Callable[[int], None] | None = None,
    ) -> int:
        """Insert a pending restore point (creating the VM row if new); return its id.

        The id is above every id this index ever gave (AUTOINCREMENT's high-water mark) and
        above `above` (ids the store has seen outside the index: files in data/, the store's
        own high-water mark), so a point id is never reused. `reserve(id)` runs inside the
        transaction, before the id is used for anything (the store records its high-water mark
        there); concurrent writers are serialized by the transaction.
        """
        now = _now()
        with self.db.atomic():
            self.db.execute(
                "INSERT OR IGNORE INTO vms (name, created, updated) VALUES (?, ?, ?)",
                [vm, now, now],
            )  # a write statement first: the write lock is held before the id is chosen
            point_id = max(self.max_point_id(), above) + 1
            self.db.execute(
                "INSERT INTO restore_points (id, vm, created, kind, state, started) "
                "VALUES (?, ?, ?, 'full', 'pending', ?)",
                [point_id, vm, utc_iso(created), now],
            )
            if reserve is not None:
                reserve(point_id)
        return point_id

    def point_ids(self) -> set[int]:
        """Ids of every restore point row, pending or committed."""
        return {row[0] for row in self.db.execute("SELECT id FROM restore_points")}

    def max_point_id(self) -> int:
        """The highest restore point id this index ever gave (0 for none)."""
        row = self.db.execute(
            "SELECT MAX(v) FROM (SELECT MAX(id) AS v FROM restore_points UNION ALL "
            "SELECT seq FROM sqlite_sequence WHERE name = 'restore_points')"
        ).fetchone()
        return int(row[0] or 0)

    def insert_committed_point(self, point: CommitRecord, created: datetime) -> None:
        """Insert a committed point with its own id (rebuilt or adopted from its sidecars)."""
        now = _now()
        with self.db.atomic():
            self.db.execute(
                "INSERT OR IGNORE INTO vms (name, created, updated) VALUES (?, ?, ?)",
                [point.vm, now, now],
            )
            self.db.execute(
                "INSERT INTO restore_points (id, vm, created, kind, state, started) "
                "VALUES (?, ?, ?, 'full', 'pending', ?)",
                [point.point_id, point.vm, utc_iso(created), now],
            )
            self._commit_point_rows(point)

    def batch(self) -> AbstractContextManager[IndexDb]:
        """One transaction around several units (a rebuild inserts every point in one commit:
        one fsync instead of one per point)."""
        return self.db.atomic()

    def raise_id_sequence(self, at_least: int) -> None:
        """Make the next AUTOINCREMENT id larger than `at_least` (ids seen outside the index)."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'restore_points', 0 "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'restore_points')"
            )
            self.db.execute(
                "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'restore_points'",
                [at_least],
            )

    def set_identity(self, store_id: str) -> None:
        """Give a rebuilt index the store's original id (backup bitmaps are named for it)."""
        with self.db.atomic():
            self.db.execute("UPDATE store SET value = ? WHERE key = 'id'", [store_id])

    def checkpoint(self, wait: float) -> bool:
        """Copy every committed transaction from the WAL into the main database and empty the
        WAL, waiting up to `wait` seconds for readers that still read an older snapshot.

        True when complete. A reader holding a read transaction on an older snapshot keeps the
        newer frames from being copied (they would change what it reads): after `wait` the
        checkpoint is partial and this returns False, so the caller can say so.
        """
        # TRUNCATE waits through the busy handler for the writer lock and for old readers.
        self.db.execute(f"PRAGMA busy_timeout = {int(max(wait, 0.0) * 1000)}")
        try:
            busy, log, done = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return bool(busy == 0 and log == done)

    def commit_point(self, point: CommitRecord) -> None:
        """Mark a pending point committed with its files, checksums and definition: one unit."""
        with self.db.atomic():
            self._commit_point_rows(point)

    def _commit_point_rows(self, point: CommitRecord) -> None:
        definition = json.dumps(point.definition) if point.definition is not None else None
        cursor = self.db.execute(
            "UPDATE restore_points SET kind = ?, state = 'committed', definition = ?, "
            "committed = ? WHERE id = ? AND state = 'pending'",
            [point.kind, definition, _now(), point.point_id],
        )
        if cursor.rowcount != 1:
            raise RuntimeError(f"restore point {point.point_id} is not pending")
        for disk in point.disks:
            self._insert_disk_rows(point, disk)

    def _insert_disk_rows(self, point: CommitRecord, disk: CommitDisk) -> None:
        """The file row and the checksum chunks of one disk.

        The `disks` table and the definition columns of `vms` (from the initial schema) are
        not written: nothing read them; a point's own row holds its definition and its disk
        rows the sizes, and the newest point answers "the VM's current definition"."""
        self.db.execute(
            "INSERT INTO point_disks (point_id, disk, file, backing_point_id, mode, "
            "virtual_size, cluster_size, stored_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                point.point_id,
                disk.name,
                disk.file,
                disk.backing_point_id,
                disk.mode,
                disk.virtual_size,
                disk.cluster_size,
                disk.stored_bytes,
            ],
        )
        for row in disk.checksums:
            self.db.execute(
                "INSERT INTO checksums (point_id, disk, chunk, algorithm, cluster_runs, "
                "digests) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    point.point_id,
                    disk.name,
                    row.chunk,
                    row.algorithm,
                    row.cluster_runs,
                    row.digests,
                ],
            )
        self._insert_zero_runs(point.point_id, disk.name, disk.zero_runs)

    def _insert_zero_runs(self, point_id: int, disk: str, runs: bytes | None) -> None:
        if runs is not None:
            self.db.execute(
                "INSERT INTO zero_runs (point_id, disk, runs) VALUES (?, ?, ?)",
                [point_id, disk, runs],
            )

    def committed_points(self, vm: str | None = None) -> list[dict[str, Any]]:
        """Committed restore points (rows), oldest first; ties in time by id."""
        where, params = ("AND vm = ?", [vm]) if vm is not None else ("", [])
        return list(
            self.db.query(
                "SELECT id, vm, created, kind, definition FROM restore_points "
                f"WHERE state = 'committed' {where} ORDER BY created, id",
                params,
            )
        )

    def committed_point(self, point_id: int) -> dict[str, Any] | None:
        """One committed restore point's row, or None."""
        rows = list(
            self.db.query(
                "SELECT id, vm, created, kind, definition FROM restore_points "
                "WHERE id = ? AND state = 'committed'",
                [point_id],
            )
        )
        return rows[0] if rows else None

    def point_disks(self, point_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The disk rows of the given points (all committed ones when None), by point and name."""
        if point_ids is None:
            return list(
                self.db.query(
                    "SELECT d.* FROM point_disks d JOIN restore_points p ON p.id = d.point_id "
                    "WHERE p.state = 'committed' ORDER BY d.point_id, d.disk"
                )
            )
        marks = ",".join("?" for _ in point_ids)
        return list(
            self.db.query(
                f"SELECT * FROM point_disks WHERE point_id IN ({marks}) ORDER BY point_id, disk",
                list(point_ids),
            )
        )

    def latest_disk(self, vm: str, disk: str) -> dict[str, Any] | None:
        """The disk row of the newest committed point of `vm` that holds `disk`, or None."""
        rows = list(
            self.db.query(
                "SELECT d.* FROM point_disks d JOIN restore_points p ON p.id = d.point_id "
                "WHERE p.vm = ? AND d.disk = ? AND p.state = 'committed' "
                "ORDER BY p.created DESC, p.id DESC LIMIT 1",
                [vm, disk],
            )
        )
        return rows[0] if rows else None

    def latest_created(self, vm: str) -> str | None:
        """The creation time (text) of the newest committed point of `vm`, or None."""
        row = self.db.execute(
            "SELECT MAX(created) FROM restore_points WHERE vm = ? AND state = 'committed'", [vm]
        ).fetchone()
        return row[0] if row else None

    def vm_names(self) -> list[str]:
        """Names of the VMs that have at least one committed restore point, sorted."""
        return [
            row[0]
            for row in self.db.execute(
                "SELECT DISTINCT vm FROM restore_points WHERE state = 'committed' ORDER BY vm"
            )
        ]

    # --- recovery -------------------------------------------------------------------------------

    def pending_points(self) -> list[dict[str, Any]]:
        """Restore points begun but never committed (their writer died or aborted)."""
        return list(
            self.db.query("SELECT id, vm FROM restore_points WHERE state = 'pending' ORDER BY id")
        )

    def forget_pending(self, point_id: int) -> None:
        """Delete a pending point's rows (it has no disks or checksums: those come at commit)."""
        with self.db.atomic():
            self.db.execute(
                "DELETE FROM restore_points WHERE id = ? AND state = 'pending'", [point_id]
            )

    # --- merges ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def write_unit(self) -> Iterator[None]:
        """One transaction that takes SQLite's write lock at once (BEGIN IMMEDIATE), so two
        writers of different VMs queue on the busy timeout instead of failing mid-unit."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def begin_merge(self, point_id: int, vm: str, plan: dict[str, Any]) -> None:
        """Mark a point as being removed, with the plan of every disk (journal step 'files')."""
        with self.write_unit():
            self.db.execute(
                "INSERT INTO merges (point_id, vm, started, step, plan) VALUES (?, ?, ?, ?, ?)",
                [point_id, vm, _now(), "files", json.dumps(plan)],
            )

    def merges(self, vm: str | None = None) -> list[dict[str, Any]]:
        """Journal rows of merges not yet finished (of one VM or all), oldest first."""
        where, params = ("WHERE vm = ?", [vm]) if vm is not None else ("", [])
        rows = list(
            self.db.query(f"SELECT * FROM merges {where} ORDER BY started, point_id", params)
        )
        for row in rows:
            row["plan"] = json.loads(row["plan"])
        return rows

    def merging_point_ids(self) -> set[int]:
        """Ids of points being removed by a merge."""
        return {row[0] for row in self.db.execute("SELECT point_id FROM merges")}

    def successor_disks(self, point_id: int) -> list[dict[str, Any]]:
        """The committed disk rows whose backing file is `point_id`'s file of that disk."""
        return list(
            self.db.query(
                "SELECT d.* FROM point_disks d JOIN restore_points p ON p.id = d.point_id "
                "WHERE d.backing_point_id = ? AND p.state = 'committed' ORDER BY d.disk",
                [point_id],
            )
        )

    def remove_merged_point(
        self, point_id: int, successors: Sequence[MergedDisk], *, retire: bool = False
    ) -> None:
        """One unit: successors take the removed point's place (backing, rows, checksums),
        the point's rows go (its checksum rows kept aside when `retire`: a reader holds it),
        and the journal moves to 'indexed'."""
        with self.write_unit():
            if retire:
                self.db.execute(
                    "INSERT OR REPLACE INTO retired_checksums SELECT c.point_id, p.vm, c.disk, "
                    "c.chunk, c.algorithm, c.cluster_runs, c.digests FROM checksums c "
                    "JOIN restore_points p ON p.id = c.point_id WHERE c.point_id = ?",
                    [point_id],
                )
            for disk in successors:
                self._replace_successor(point_id, disk)
            self.db.execute("DELETE FROM point_disks WHERE point_id = ?", [point_id])
            self.db.execute("DELETE FROM restore_points WHERE id = ?", [point_id])
            self.db.execute("UPDATE merges SET step = 'indexed' WHERE point_id = ?", [point_id])

    def _replace_successor(self, point_id: int, disk: MergedDisk) -> None:
        self.db.execute(
            "UPDATE point_disks SET backing_point_id = ?, stored_bytes = ?, mode = ? "
            "WHERE point_id = ? AND disk = ?",
            [disk.backing_point_id, disk.stored_bytes, disk.mode, disk.point_id, disk.name],
        )
        self.db.execute(
            "DELETE FROM checksums WHERE point_id = ? AND disk = ?", [disk.point_id, disk.name]
        )
        for row in disk.checksums:
            self.db.execute(
                "INSERT INTO checksums (point_id, disk, chunk, algorithm, cluster_runs, "
                "digests) VALUES (?, ?, ?, ?, ?, ?)",
                [disk.point_id, disk.name, row.chunk, row.algorithm, row.cluster_runs, row.digests],
            )
        self.db.execute(
            "DELETE FROM zero_runs WHERE point_id = ? AND disk = ?", [disk.point_id, disk.name]
        )
        self._insert_zero_runs(disk.point_id, disk.name, disk.zero_runs)
        self.db.execute(
            "UPDATE restore_points SET kind = ? WHERE id = ?", [disk.point_kind, disk.point_id]
        )

    def retired_points(self, vm: str | None = None) -> list[int]:
        """Ids of removed points whose checksum rows are kept for their readers."""
        where, params = ("WHERE vm = ?", [vm]) if vm is not None else ("", [])
        rows = self.db.execute(
            f"SELECT DISTINCT point_id FROM retired_checksums {where} ORDER BY point_id", params
        )
        return [row[0] for row in rows]

    def forget_retired(self, point_id: int) -> None:
        """Drop the kept checksum rows of a removed point (its last reader is gone)."""
        with self.write_unit():
            self.db.execute("DELETE FROM retired_checksums WHERE point_id = ?", [point_id])

    def end_merge(self, point_id: int) -> None:
        """Forget a finished merge's journal row."""
        with self.write_unit():
            self.db.execute("DELETE FROM merges WHERE point_id = ?", [point_id])

    # --- checksums ------------------------------------------------------------------------------

    def checksum_row(self, point_id: int, disk: str, chunk: int) -> ChecksumRow | None:
        """One chunk's checksum row of a file, or None when it stores no cluster there."""
        for table in ("checksums", "retired_checksums"):  # a removed point's, for its readers
            row = self.db.execute(
                f"SELECT chunk, algorithm, cluster_runs, digests FROM {table} "
                "WHERE point_id = ? AND disk = ? AND chunk = ?",
                [point_id, disk, chunk],
            ).fetchone()
            if row is not None:
                return ChecksumRow(row[0], row[1], bytes(row[2]), bytes(row[3]))
        return None

    def zero_runs(self, point_id: int, disk: str) -> bytes | None:
        """A file's recorded zero-run blob, or None when it was never recorded."""
        row = self.db.execute(
            "SELECT runs FROM zero_runs WHERE point_id = ? AND disk = ?", [point_id, disk]
        ).fetchone()
        return None if row is None else bytes(row[0])

    def checksum_rows(self, point_id: int, disk: str) -> list[ChecksumRow]:
        """Every checksum row of a file, in guest order."""
        cursor = self.db.execute(
            "SELECT chunk, algorithm, cluster_runs, digests FROM checksums "
            "WHERE point_id = ? AND disk = ? ORDER BY chunk",
            [point_id, disk],
        )
        return [ChecksumRow(c, a, bytes(r), bytes(d)) for c, a, r, d in cursor.fetchall()]

    def checksum_state(self, point_id: int, disk: str) -> dict[str, int]:
        """How many clusters of a file have a checksum, and how many bytes of index that costs."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(digests)), 0), "
            "COALESCE(SUM(LENGTH(cluster_runs)), 0) FROM checksums "
            "WHERE point_id = ? AND disk = ?",
            [point_id, disk],
        ).fetchone()
        return {
            "rows": row[0],
            "clusters": row[1] // DIGEST_SIZE,
            "index_bytes": row[1] + row[2],
        }

    def row_counts(self) -> dict[str, int]:
        """Rows per table (for the index-cost benchmark and `info`)."""
        tables = ("vms", "disks", "restore_points", "point_disks", "checksums", "events")
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}

    # --- events ---------------------------------------------------------------------------------

    def record_event(
        self,
        vm: str | None,
        kind: str,
        message: str,
        *,
        point_id: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append one event to the log."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO events (time, vm, point_id, kind, message, details) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [_now(), vm, point_id, kind, message, json.dumps(details or {}, default=str)],
            )

    def events(self, vm: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Events, oldest first, optionally of one VM and/or one kind."""
        clauses, params = [], []
        if vm is not None:
            clauses.append("vm = ?")
            params.append(vm)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = list(self.db.query(f"SELECT * FROM events {where} ORDER BY id", params))
        for row in rows:
            row["details"] = json.loads(row["details"]) if row["details"] else {}
        return rows


@dataclass(frozen=True)
class CommitDisk:
    """What the index records for one disk of a restore point being committed."""

    name: str
    file: str
    backing_point_id: int | None
    mode: str
    virtual_size: int
    cluster_size: int
    stored_bytes: int
    checksums: tuple[ChecksumRow, ...]
    """Encoded rows (lbstore.checksums.ChecksumChunk.encode)."""
    zero_runs: bytes | None = None
    """The file's own zero clusters (lbstore.checksums.encode_zero_runs); None: not known."""


@dataclass(frozen=True)
class MergedDisk:
    """A successor's disk after a merge: what `Index.remove_merged_point` writes for it."""

    point_id: int
    name: str
    backing_point_id: int | None
    stored_bytes: int
    mode: str
    point_kind: str
    checksums: tuple[ChecksumRow, ...]
    zero_runs: bytes | None = None


@dataclass(frozen=True)
class CommitRecord:
    """Everything `Index.commit_point` writes in its one transaction."""

    point_id: int
    vm: str
    kind: str
    definition: dict[str, Any] | None
    disks: tuple[CommitDisk, ...]
