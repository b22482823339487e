"""The runs registry: a SQL database (SQLite by default, any SQLAlchemy URL) of every run and of
the model versions registered from them.

A run's row ties a model to what made it: the config (and its hash), the dataset fingerprint
from the manifest, the stoker version, the git commit of the user's working directory, the
metrics, the checkpoint and the status. Every write is one transaction, so a crash never
leaves half a record; model versions are numbered inside the transaction that inserts them and
a unique (name, version) constraint makes two concurrent registrations retry, not collide.
Changing a model's stages locks that model's rows (SELECT ... FOR UPDATE where the database has
row locks), so two concurrent promotions leave one production version, not two.
"""

import errno
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from stoker import __version__, atomic
from stoker.errors import UserError
from stoker.trainer.run_spec import RunSpec

ENV_URL = "STOKER_REGISTRY_URL"
# A submitted job runs from an uploaded copy without .git; `stoker submit` passes the commit.
ENV_GIT_COMMIT = "STOKER_GIT_COMMIT"
# Set by `stoker submit` in the job's environment, so the run links back to its Ray Job.
ENV_SUBMISSION_ID = "STOKER_SUBMISSION_ID"
ENV_RUN_ID = "STOKER_RUN_ID"
STAGES = ("none", "staging", "production", "archived")
STATUSES = ("submitted", "running", "succeeded", "failed", "stopped")
# PostgreSQL advisory-lock key held while the tables are created ("stkr" in ASCII).
SCHEMA_LOCK = 0x73746B72
MODEL_LOCK = 0x6D6F64  # ...and the namespace of the per-model locks ("mod")
ALLOCATION_ATTEMPTS = 20


class Base(DeclarativeBase):
    pass


class RunRecord(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    config_hash: Mapped[str | None] = mapped_column(String(71))
    config: Mapped[dict | None] = mapped_column(JSON)
    data_fingerprint: Mapped[str | None] = mapped_column(String(80))
    data_path: Mapped[str | None] = mapped_column(Text)
    stoker_version: Mapped[str] = mapped_column(String(32))
    git_commit: Mapped[str | None] = mapped_column(String(64))
    git_dirty: Mapped[bool | None]
    run_dir: Mapped[str | None] = mapped_column(Text)
    checkpoint: Mapped[str | None] = mapped_column(Text)
    metric: Mapped[str | None] = mapped_column(String(64))
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    submission_id: Mapped[str | None] = mapped_column(String(128))
    address: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    versions: Mapped[list["ModelVersion"]] = relationship(back_populates="run")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16), default="none")
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    checkpoint: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    run: Mapped[RunRecord] = relationship(back_populates="versions")


def resolve_url(config_url: str | None, storage: str | Path = "runs", override: str | None = None) -> str:
    """`--registry` beats STOKER_REGISTRY_URL beats the config; the default is SQLite in storage
    (for `s3://` storage, in its local staging directory: SQLite needs a local file)."""
    url = override or os.environ.get(ENV_URL) or config_url
    if url:
        return url
    from stoker.trainer.run_dir import local_storage

    return f"sqlite:///{(local_storage(str(storage)) / 'registry.db').resolve()}"


def redact(url: str) -> str:
    """The URL as it may be printed: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


class RegistryUnavailable(UserError):
    """The registry could not be opened or written for a reason that is not its URL: a lock held
    too long by another process, a full or failing disk, a server that refuses connections for
    now. Still exit 2 with one line, but one that does not send the user to their config."""


class Registry:
    """A connection to the registry database; tables are created on first use.

    Opening is safe when many processes open a fresh registry at once (a sweep of `stoker train`
    processes on new storage): the schema is created under one lock per database, SQLite's
    write lock (BEGIN IMMEDIATE) or PostgreSQL's advisory lock, and creation is idempotent, so
    the processes that wait find the tables made and go on. The schema has not changed since
    the registry's first release, so there is no migration step; one belongs in
    `_create_schema`, under the same lock.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = make_url(url)
            backend = parsed.get_backend_name()
            if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
                # SQLite creates the file but not its directory.
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url)
        except (ArgumentError, SQLAlchemyError, OSError, ImportError) as exc:
            raise _open_error(url, exc, "connect") from None
        if backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        # Reads take no write lock: a `runs list` never waits for (or delays) a training's write.
        self._reader = self.engine.execution_options(stoker_read_only=True)
        phase = "connect"
        try:
            with self._reader.connect() as connection:
                phase = "schema"
                complete = _schema_complete(connection)
            if not complete:
                _create_schema(self.engine)
        except (SQLAlchemyError, OSError) as exc:
            self.engine.dispose()
            raise _open_error(url, exc, phase) from None

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises. On SQLite a
        writing session holds the database's write lock from its first statement (BEGIN
        IMMEDIATE), so a read-then-write never fails halfway on a lock another writer took; a
        reading one (`write=False`) takes none."""
        try:
            with Session(self.engine if write else self._reader, expire_on_commit=False) as session, session.begin():
                yield session
        except OperationalError as exc:
            error = _open_error(self.url, exc, "write")
            if isinstance(error, RegistryUnavailable):
                raise error from None
            raise

    def close(self) -> None:
        self.engine.dispose()

    # -- runs ---------------------------------------------------------------------------------

    def upsert_run(self, run_id: str, **fields: Any) -> RunRecord:
        now = datetime.now(UTC)
        with self.session() as session:
            record = session.get(RunRecord, run_id)
            if record is None:
                record = RunRecord(id=run_id, created_at=now, stoker_version=__version__)
                session.add(record)
            for key, value in fields.items():
                if value is not None:
                    setattr(record, key, value)
            if fields.get("status") in ("running", "succeeded") and "error" in fields and fields["error"] is None:
                record.error = None  # a resumed run is no longer failed: its old error goes
            record.updated_at = now
        return record

    def runs(self, name: str | None = None, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        query = select(RunRecord).order_by(RunRecord.created_at.desc())
        if name:
            query = query.where(RunRecord.name == name)
        if status:
            query = query.where(RunRecord.status == status)
        if limit:
            query = query.limit(limit)
        with self.session(write=False) as session:
            return list(session.scalars(query))

    def find_run(self, ref: str) -> RunRecord:
        """A run by id, id prefix (at least 6 characters), name (the latest of that name) or
        directory (`runs/digits-demo`, as `stoker export` takes it)."""
        with self.session(write=False) as session:
            record = session.get(RunRecord, ref)
            if record is None:
                named = session.scalars(
                    select(RunRecord).where(RunRecord.name == ref).order_by(RunRecord.created_at.desc())
                ).first()
                record = named
            if record is None and len(ref) >= 6:
                matches = list(session.scalars(select(RunRecord).where(RunRecord.id.startswith(ref))))
                if len(matches) > 1:
                    raise UserError(f"run {ref!r} is ambiguous: {', '.join(r.id for r in matches)}")
                record = matches[0] if matches else None
            if record is None and (ref.startswith("s3://") or Path(ref).is_dir()):
                where = ref.rstrip("/") if ref.startswith("s3://") else str(Path(ref).resolve())
                record = session.scalars(
                    select(RunRecord).where(RunRecord.run_dir == where).order_by(RunRecord.created_at.desc())
                ).first()
        if record is None:
            raise UserError(f"run {ref!r} is not in the registry {redact(self.url)}")
        return record

    # -- model versions -----------------------------------------------------------------------

    def registered_version(self, run_ref: str, name: str) -> ModelVersion | None:
        """The latest version of model `name` registered from the run `run_ref`, if any."""
        run = self.find_run(run_ref)
        with self.session(write=False) as session:
            return _version_of_run(session, name, run.id)

    def register_model(self, run_ref: str, name: str, stage: str = "none", new_version: bool = False) -> ModelVersion:
        """The run as the next version of model `name`. A run already registered under that
        name returns its existing version (unchanged) unless `new_version`: registering the same
        run twice is almost always a retried command, not a wish for a duplicate."""
        if stage not in STAGES:
            raise UserError(f"--stage: must be one of {', '.join(STAGES)}, got {stage!r}")
        run = self.find_run(run_ref)
        if run.status != "succeeded":
            raise UserError(f"run {run.id} ({run.name}) is {run.status}; only succeeded runs can be registered")
        for attempt in range(ALLOCATION_ATTEMPTS):
            try:
                with self.session() as session:
                    _lock_model(session, name)
                    if not new_version and (existing := _version_of_run(session, name, run.id)) is not None:
                        return existing
                    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
                    version = ModelVersion(
                        name=name, version=(latest or 0) + 1, stage="none", run_id=run.id,
                        checkpoint=run.checkpoint, created_at=datetime.now(UTC),
                    )
                    session.add(version)
                    if stage != "none":
                        _set_stage(session, version, stage)
                return version
            except IntegrityError:
                # Another registration took this number; take the next one, after a jittered
                # pause so a crowd of writers spreads out instead of colliding again.
                time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
        raise RuntimeError(f"could not allocate a version number for model {name!r}")

    def set_stage(self, name: str, version: int, stage: str) -> ModelVersion:
        if stage not in STAGES:
            raise UserError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
        with self.session() as session:
            _lock_model(session, name)
            record = session.scalars(
                select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
            ).first()
            if record is None:
                raise UserError(f"model {name!r} has no version {version}")
            _set_stage(session, record, stage)
        return record

    def models(self, name: str | None = None) -> list[ModelVersion]:
        query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
        if name:
            query = query.where(ModelVersion.name == name)
        with self.session(write=False) as session:
            return list(session.scalars(query))


def _version_of_run(session: Session, name: str, run_id: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.run_id == run_id)
        .order_by(ModelVersion.version.desc())
    ).first()


def _lock_model(session: Session, name: str) -> None:
    """Serialise writers of one model's versions where the database offers a lock for a name
    (PostgreSQL's transaction-scoped advisory locks); elsewhere the unique (name, version)
    constraint and the retry in `register_model` do it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))"), {"space": MODEL_LOCK, "name": name})


def _set_stage(session: Session, version: ModelVersion, stage: str) -> None:
    # One production (and one staging) version per model: promoting archives the previous one.
    if stage in ("production", "staging"):
        # Lock every version of this model, then read their stages as committed by whoever
        # held the lock before us (populate_existing: not the copies this session loaded).
        rows = session.scalars(
            select(ModelVersion).where(ModelVersion.name == version.name)
            .with_for_update().execution_options(populate_existing=True)
        )
        for other in rows:
            if other is not version and other.stage == stage:
                other.stage = "archived"
    version.stage = stage


# How long a SQLite writer waits for another process's transaction before giving up. Writers
# hold the lock for milliseconds; this is for a crowd of them on a slow disk.
SQLITE_BUSY_S = 30.0
SCHEMA_ATTEMPTS = 5


def _sqlite_connect(connection, _record) -> None:
    # Transactions are begun by `_sqlite_begin`, not by the sqlite3 module (which does not begin
    # one before a SELECT or a CREATE TABLE, so a check-then-create could interleave).
    connection.isolation_level = None
    cursor = connection.cursor()
    # Concurrent `stoker train` processes share one file: wait for the lock instead of failing.
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_S * 1000)}")
    cursor.execute("PRAGMA foreign_keys = ON")
    # Write-ahead log: readers never block the writer nor it them, and a commit is one append.
    # The mode is kept in the file, so only the first open of a fresh registry switches it; the
    # switch needs the file to itself and fails at once (busy_timeout is not consulted) while
    # another process holds any lock: retried here until the same deadline.
    deadline = time.monotonic() + SQLITE_BUSY_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if name.startswith("SQLITE_READONLY"):
                break  # a registry the user may only read stays in its mode
            if not name.startswith("SQLITE_BUSY") or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.002, 0.02))
    cursor.close()


def _sqlite_begin(connection) -> None:
    if connection.get_execution_options().get("stoker_read_only"):
        connection.exec_driver_sql("BEGIN DEFERRED")  # WAL: a reader takes no lock
        return
    # A writer takes the write lock at the start (BEGIN IMMEDIATE). A deferred transaction that
    # read first and then writes cannot wait: SQLite fails it at once with "database is locked"
    # if another writer committed in between. The wait is ours, not busy_timeout's: SQLite's
    # handler backs off to 100 ms sleeps, so a waiter among writers that each hold the lock
    # for milliseconds keeps finding it taken: 8 processes opening a fresh registry and writing
    # (benchmarks/concurrency.py, a loaded 2-core machine) waited up to 2.6-7.5 s to open with
    # it, 0.6-1.2 s polling at most every 5 ms as here.
    raw = connection.connection.driver_connection
    raw.execute("PRAGMA busy_timeout = 0")
    deadline = time.monotonic() + SQLITE_BUSY_S
    delay = 0.0005
    try:
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY") or time.monotonic() >= deadline:
                    raise OperationalError("BEGIN IMMEDIATE", None, exc) from None
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.005)
    finally:
        raw.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_S * 1000)}")


def _schema_complete(connection) -> bool:
    """Whether every registry table exists with every column this version writes. A table of
    that name with columns missing is another program's (or a future migration's) business:
    refused with the names, not written into until an INSERT fails."""
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            return False
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in present]
        if missing:
            named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise SchemaRefused(f"it has a table {table.name!r} without the registry's columns {named}")
    return True


def _create_schema(engine: Engine) -> None:
    """Create the tables (and, once there are any, run migrations) exactly once however many
    processes open a fresh registry together: inside one transaction that holds the database's
    schema lock, re-checking what exists after the lock is taken."""
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            # SQLite: the transaction is BEGIN IMMEDIATE (`_sqlite_begin`), the database's one
            # write lock; its DDL is transactional, so a crash leaves no half schema.
            with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Racing CREATE TABLEs collide in PostgreSQL's catalog (a unique violation on
                    # pg_type): one at a time; DDL there is transactional too.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                if not _schema_complete(connection):
                    Base.metadata.create_all(connection)
                    _schema_complete(connection)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            # A backend without a lock here (MySQL's DDL is not transactional) can lose the race
            # to another process's CREATE: look again, and the tables it made are found. Under
            # a lock a failure is the database's answer (a refusal, a timeout): not retried.
            if engine.dialect.name in ("sqlite", "postgresql") or attempt == SCHEMA_ATTEMPTS - 1:
                raise
            with engine.connect() as connection:
                if _schema_complete(connection):
                    return
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))


class SchemaRefused(SQLAlchemyError):
    """The database holds tables of the registry's names that are not the registry's."""


# SQLite result codes (sqlite3's sqlite_errorname) and PostgreSQL SQLSTATE classes that say the
# registry is busy or its storage failed, not that its URL is wrong; with what to do about it.
_LOCKED = "another process held the registry's lock for over {busy:g} s"
_UNAVAILABLE = (
    (("SQLITE_BUSY", "SQLITE_LOCKED"), _LOCKED),
    (("SQLITE_FULL",), "the disk holding it is full"),
    (("SQLITE_IOERR", "SQLITE_NOMEM", "SQLITE_PROTOCOL"), "its storage failed"),
    (("SQLITE_READONLY",), "its file or directory is not writable by this user"),
    (("SQLITE_CORRUPT",), "its file is damaged; restore it from a copy"),
    (("40",), "it lost a race with another writer"),  # serialization failure, deadlock
    (("53",), "the database server is out of disk, memory or connections"),
    (("55P03", "57"), "the database server is busy, restarting or shutting down"),
)


def _open_error(url: str, exc: BaseException, phase: str) -> UserError:
    """One line for a failure to open or write the registry, saying whose problem it is: the
    URL's (`cluster.registry.url`), the database's refusal of the schema (with its own
    message), or neither (a lock, a full disk: RegistryUnavailable, which blames no key).
    `phase` is where it failed: "connect", "schema" (reading or creating the tables) or "write"."""
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    code = getattr(orig, "sqlite_errorname", None) or getattr(orig, "sqlstate", None) or ""
    if isinstance(exc, OSError):  # creating the SQLite file's directory: the same causes
        code = {errno.ENOSPC: "SQLITE_FULL", errno.EDQUOT: "SQLITE_FULL", errno.EIO: "SQLITE_IOERR"}.get(exc.errno, "")
    for prefixes, why in _UNAVAILABLE:
        if code.startswith(prefixes):
            why = why.format(busy=SQLITE_BUSY_S)
            return RegistryUnavailable(
                f"registry {redact(url)} is unavailable: {reason} ({why}; not a configuration problem: "
                "retry once that is fixed)"
            )
    if phase == "schema" or isinstance(exc, SchemaRefused):
        return UserError(f"cluster.registry.url: the database at {redact(url)} refused the registry's schema: {reason}")
    return UserError(f"cluster.registry.url: cannot open registry {redact(url)}: {reason}")


# -- recording runs -------------------------------------------------------------------------------


def config_hash(config: dict) -> str:
    """SHA-256 of the resolved config, canonically serialised; the run name is left out so two
    runs of the same recipe hash alike."""
    recipe = {k: v for k, v in config.items() if k not in ("name", "storage")}
    return "sha256:" + hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class GitState:
    commit: str | None
    dirty: bool | None


def git_state(directory: str | Path = ".") -> GitState:
    """The commit checked out in `directory` and whether the tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=10,
            )
            return GitState(commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        pass
    commit_env = os.environ.get(ENV_GIT_COMMIT)
    if commit_env:
        dirty = commit_env.endswith("-dirty")
        return GitState(commit_env.removesuffix("-dirty"), dirty)
    return GitState(None, None)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_id_for(run_dir: Path) -> str:
    """The run's id, kept in the run directory: a resumed run keeps it, a `--fresh` run (which
    deletes the directory) gets a new one."""
    from stoker.trainer.run_dir import Records

    path = Records(run_dir).run_id
    if path.exists():
        return path.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    # A submitted run was given its id by `stoker submit`, so both sides update one record.
    run_id = os.environ.get(ENV_RUN_ID) or new_run_id()
    atomic.write_text(path, run_id + "\n")
    return run_id


def best_checkpoint(run_dir: Path, best_epoch: int | None) -> str | None:
    """The best epoch's checkpoint if Ray Train kept it, else the latest one that exists."""
    from stoker.trainer.run_dir import Records

    with_checkpoint = [r for r in Records(run_dir).metrics() if r.get("checkpoint") and Path(r["checkpoint"]).exists()]
    for record in with_checkpoint:
        if record.get("epoch") == best_epoch:
            return record["checkpoint"]
    if with_checkpoint:
        return with_checkpoint[-1]["checkpoint"]
    existing = sorted(run_dir.glob("checkpoint_*"))
    return str(existing[-1]) if existing else None


def run_fields(run_dir: Path, config: dict | None = None) -> dict[str, Any]:
    """What the run directory says about the run: config, dataset, metrics, checkpoint."""
    from stoker.trainer.run_dir import Records

    records = Records(run_dir)
    if config is None:
        config = records.config()
    dataset = records.dataset() or {}
    final = records.final()
    fields: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data_fingerprint": dataset.get("source_fingerprint"),
        "data_path": dataset.get("path"),
    }
    if config:
        fields.update(name=config.get("name"), config=config, config_hash=config_hash(config))
        if not fields["data_path"]:
            fields["data_path"] = (config.get("data") or {}).get("output")
    if final:
        metric = final.get("metric")
        fields.update(
            metrics={"validation": final.get("validation"), "test": final.get("test"), "scaling": records.scaling()},
            metric=metric, best_epoch=final.get("best_epoch"),
            score=(final.get("validation") or {}).get(metric.removeprefix("val_")) if metric else None,
            data_fingerprint=fields["data_fingerprint"] or final.get("source_fingerprint"),
        )
        fields["checkpoint"] = best_checkpoint(run_dir, final.get("best_epoch"))
    else:
        fields["checkpoint"] = best_checkpoint(run_dir, None)
        # A run that has not finished (running, stopped, failed) still shows its workers, its
        # resizes and its preemptions.
        scaling = records.scaling()
        if scaling:
            fields["metrics"] = {"scaling": scaling}
    return fields


def registry_for_run(run: RunSpec) -> Registry:
    """The registry a run records into: its `cluster.registry.url` when it has that section (the
    CLI's `stoker.config.RunConfig`), else the default for its storage."""
    cluster = getattr(run, "cluster", None)
    config_url = cluster.registry.url if cluster is not None else None
    return Registry(resolve_url(config_url, run.storage))


def record_run(run_dir: str | Path, status: str, run: RunSpec, error: str | None = None, uri: str | None = None,
               **extra: Any) -> str:
    """Record (or update) the run whose directory is `run_dir`; returns its id.

    `run` is the validated run (the CLI's RunConfig): the record's config, and the registry it
    goes to, are the run's, whether or not the run directory holds a config.yaml yet.
    `uri` is where the run lives when `run_dir` is the local staging copy of its records (an
    `s3://` run, stoker.trainer.run_dir): the record names it and its best checkpoint there.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    run_dir = Path(run_dir).resolve()
    config = run.model_dump(mode="json")
    fields = run_fields(run_dir, config) if run_dir.exists() else {"run_dir": str(run_dir)}
    if uri is not None:
        from stoker.trainer.run_dir import Records

        final = Records(run_dir).final() or {}
        fields["run_dir"] = uri
        fields["checkpoint"] = f"{uri.rstrip('/')}/{final['checkpoint']}" if final.get("checkpoint") else None
    fields.setdefault("name", run.name)
    fields.setdefault("config", config)
    fields.setdefault("config_hash", config_hash(config))
    registry = registry_for_run(run)
    git = git_state(Path.cwd())
    try:
        run_id = run_id_for(run_dir)
        extra.setdefault("submission_id", os.environ.get(ENV_SUBMISSION_ID))
        registry.upsert_run(
            run_id, status=status, error=error, git_commit=git.commit, git_dirty=git.dirty,
            **fields, **extra,
        )
    except OperationalError as exc:
        # The registry opened, so its URL is right: a failed write is the database's state.
        raise RegistryUnavailable(f"registry {redact(registry.url)}: cannot record run {fields.get('name')}: "
                                  f"{str(exc).splitlines()[0]}") from None
    finally:
        registry.close()
    return run_id
