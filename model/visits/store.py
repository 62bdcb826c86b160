"""The records folder: one SQLite file whose every value is sealed (`model.visits.vault`).

    meta(name, value)                    the wrapped keys and the KDF's salt (no secret in plaintext)
    visits(row, patient, summary, body)  row and patient: keyed hashes of the references; the rest sealed
    photos(row, n, jpeg)                 each photo's JPEG, sealed, in the visit's order

A save is one transaction: a process killed halfway leaves the earlier visits and no half visit.
Writers take SQLite's write lock at once (BEGIN IMMEDIATE) and wait up to 30 s for it, so two tabs
saving at the same moment both land. Deleting overwrites the freed pages (secure_delete) and then
compacts the file (VACUUM), so a deleted visit is gone from the disk, not only from the index; temp
files stay in memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from model.visits.vault import Keys, RecordsError, new_keys, unlock
from model.visits.visit import Visit, VisitSummary

FILE = "visits.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS visits (row TEXT PRIMARY KEY, patient TEXT NOT NULL, summary BLOB NOT NULL,
                                   body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS visits_by_patient ON visits (patient);
CREATE TABLE IF NOT EXISTS photos (row TEXT NOT NULL REFERENCES visits (row) ON DELETE CASCADE,
                                   n INTEGER NOT NULL, jpeg BLOB NOT NULL, PRIMARY KEY (row, n));
"""


class VisitStore:
    """The visits under `folder`, unlocked with `passphrase` (a new folder is made with it)."""

    def __init__(self, folder: Path | str, passphrase: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise RecordsError(f"--records {self.folder} is a file; give a folder for the records")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600))
        try:
            with self._read() as db:
                header = db.execute("SELECT value FROM meta WHERE name = 'keys'").fetchone() if _has_meta(db) else None
        except sqlite3.DatabaseError as err:
            raise RecordsError(f"{self.path} is not a SkinGPT records file ({err}); give another --records folder") from None
        self.keys = unlock(passphrase, json.loads(header[0])) if header else self._create(passphrase)

    # -- connections ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        for pragma in ("secure_delete = ON", "temp_store = MEMORY", "foreign_keys = ON", "synchronous = FULL",
                       "journal_mode = DELETE"):
            db.execute(f"PRAGMA {pragma}")
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its start: all of it lands, or none."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    def _create(self, passphrase: str) -> Keys:
        keys, header = new_keys(passphrase)
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('keys', ?)", (json.dumps(header),))
            stored = db.execute("SELECT value FROM meta WHERE name = 'keys'").fetchone()[0]
        # two processes made the folder at once: the first one's keys stand, under the same passphrase
        return keys if stored == json.dumps(header) else unlock(passphrase, json.loads(stored))

    def _compact(self) -> None:
        with self._read() as db:
            db.execute("VACUUM")
        self.path.chmod(stat.S_IRUSR | stat.S_IWUSR)

    # -- visits -----------------------------------------------------------------------------------
    def save(self, visit: Visit, jpegs: list[bytes]) -> VisitSummary:
        """Store a visit and its photos (JPEGs, one per `visit.photos`) in one transaction."""
        if len(jpegs) != len(visit.photos):
            raise ValueError(f"{len(visit.photos)} photo records but {len(jpegs)} JPEGs")
        summary = VisitSummary.of(visit, jpegs)
        row, k = self.keys.name("visit", visit.visit), self.keys
        with self._write() as db:
            if db.execute("SELECT 1 FROM visits WHERE row = ?", (row,)).fetchone():
                raise RecordsError(f"visit {visit.visit} is already saved")
            db.execute("INSERT INTO visits (row, patient, summary, body) VALUES (?, ?, ?, ?)",
                       (row, k.name("patient", visit.patient), k.seal("summary", row, summary.model_dump_json().encode()),
                        k.seal("visit", row, visit.model_dump_json().encode())))
            db.executemany("INSERT INTO photos (row, n, jpeg) VALUES (?, ?, ?)",
                           [(row, n, k.seal(f"photo{n}", row, data)) for n, data in enumerate(jpegs)])
        return summary

    def summaries(self, patient: str | None = None) -> list[VisitSummary]:
        """The visits (of one patient, or all), newest first."""
        query, params = "SELECT row, summary FROM visits", ()
        if patient is not None:
            query, params = query + " WHERE patient = ?", (self.keys.name("patient", patient),)
        with self._read() as db:
            rows = db.execute(query, params).fetchall()
        found = [_parse(VisitSummary, self.keys.open("summary", row, sealed)) for row, sealed in rows]
        return sorted(found, key=lambda s: (_when(s.created), s.saved), reverse=True)

    def load(self, visit: str) -> tuple[Visit, list[bytes]]:
        """A visit and its photos' JPEGs, in order."""
        row = self.keys.name("visit", visit)
        with self._read() as db:
            found = db.execute("SELECT body FROM visits WHERE row = ?", (row,)).fetchone()
            photos = db.execute("SELECT n, jpeg FROM photos WHERE row = ? ORDER BY n", (row,)).fetchall()
        if found is None:
            raise RecordsError(f"no visit {visit} in these records; {{command:records list}} shows them")
        record = _parse(Visit, self.keys.open("visit", row, found[0]))
        return record, [self.keys.open(f"photo{n}", row, sealed) for n, sealed in photos]

    def delete(self, visit: str) -> bool:
        """Delete one visit (really: its pages overwritten, the file compacted); False if it was not there."""
        with self._write() as db:
            gone = db.execute("DELETE FROM visits WHERE row = ?", (self.keys.name("visit", visit),)).rowcount
        if gone:
            self._compact()
        return bool(gone)

    def delete_patient(self, patient: str) -> int:
        """Delete every visit of a patient; how many there were."""
        with self._write() as db:
            gone = db.execute("DELETE FROM visits WHERE patient = ?", (self.keys.name("patient", patient),)).rowcount
        if gone:
            self._compact()
        return gone

    def purge(self, retain_days: int, now: datetime | None = None) -> int:
        """Delete the visits older than `retain_days` days; how many went."""
        cutoff = (now or datetime.now().astimezone()) - timedelta(days=retain_days)
        old = [s.visit for s in self.summaries() if _when(s.created) < cutoff]
        with self._write() as db:
            db.executemany("DELETE FROM visits WHERE row = ?", [(self.keys.name("visit", v),) for v in old])
        if old:
            self._compact()
        return len(old)


def _has_meta(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is not None


def _parse(schema, data: bytes):
    try:
        return schema.model_validate_json(data)
    except ValidationError as err:
        raise RecordsError(f"a stored visit does not read as this version's records ({err.errors()[0]['msg']}); "
                           "use the SkinGPT version that wrote it") from None


def _when(created: str) -> datetime:
    when = datetime.fromisoformat(created)
    return when if when.tzinfo else when.astimezone()
