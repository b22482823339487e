"""The runs registry on a real PostgreSQL server, started on loopback by the test: records,
listing, comparison and model versions, and the transactions that keep concurrent writers
(several `stoker train` / `stoker models` processes sharing one registry) from colliding.

The server is the machine's PostgreSQL (`initdb`/`postgres` on PATH or under
/usr/lib/postgresql/*/bin; Debian's `postgresql` package); the driver is psycopg 3.
"""

import threading

import pytest

from stoker.cli import main
from stoker.cluster.registry import Registry
from tests.cluster.test_registry import fake_run_dir, record

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")


@pytest.fixture
def database(postgres, request):
    """A new, empty database per test; its SQLAlchemy URL."""
    name = "t_" + request.node.name.lower()[:50]
    with psycopg.connect(postgres["admin"], autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://stoker@127.0.0.1:{postgres['port']}/{name}"


def in_parallel(count: int, work) -> tuple[list, list]:
    """Run `work(i)` on `count` threads released together; results and exceptions."""
    barrier, results, errors = threading.Barrier(count), [], []

    def run(i):
        barrier.wait()
        try:
            results.append(work(i))
        except Exception as exc:  # noqa: BLE001 - surfaced by the callers' assertions
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_runs_are_recorded_listed_shown_and_compared(postgres, database, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STOKER_REGISTRY_URL", database)  # how a team points every run at one database
    a = record(fake_run_dir(tmp_path, "a", lr=0.003, test_acc=0.9), "succeeded")
    b = record(fake_run_dir(tmp_path, "b", lr=0.01, test_acc=0.8, fingerprint="sha256:def"), "succeeded")

    # The rows are in PostgreSQL, readable by any client.
    name = database.rsplit("/", 1)[1]
    with psycopg.connect(f"{postgres['admin'].replace('dbname=postgres', '')} dbname={name}") as conn:
        rows = conn.execute("select id, name, status, data_fingerprint from runs order by name").fetchall()
    assert rows == [(a, "a", "succeeded", "sha256:abc"), (b, "b", "succeeded", "sha256:def")]

    monkeypatch.delenv("STOKER_REGISTRY_URL")
    registry = ["--registry", database]
    capsys.readouterr()
    assert main(["runs", "list", "--json", *registry]) == 0
    assert [line.split('"id": "')[1][:len(a)] for line in capsys.readouterr().out.splitlines()] == [b, a]
    assert main(["runs", "compare", "a", "b", *registry]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["config.train.optimizer.lr"] == ["0.003", "0.01"] and rows["metrics.test.accuracy"] == ["0.9000", "0.8000"]
    assert main(["models", "register", "b", "--name", "digits", "--stage", "staging", *registry]) == 0
    assert capsys.readouterr().out.startswith(f"registered digits version 1 (stage staging) from run {b}")
    # A record that does not exist is a user error naming the (password-free) database.
    assert main(["runs", "show", "zzz", *registry]) == 2
    assert f"run 'zzz' is not in the registry {database}" in capsys.readouterr().err


def test_concurrent_writers_on_a_fresh_database(database, tmp_path, monkeypatch):
    """Eight processes' worth of connections at once: creating the tables, registering versions
    of one model and promoting versions to production all race, and the database still ends
    consistent: versions 1..8 once each, exactly one production version."""
    registries, errors = in_parallel(8, lambda _: Registry(database))
    assert not errors, errors
    monkeypatch.setenv("STOKER_REGISTRY_URL", database)
    run_id = record(fake_run_dir(tmp_path), "succeeded")

    versions, errors = in_parallel(8, lambda i: registries[i].register_model(run_id, "digits", new_version=True).version)
    assert not errors, errors
    assert sorted(versions) == list(range(1, 9))

    _, errors = in_parallel(8, lambda i: registries[i].set_stage("digits", i + 1, "production").version)
    assert not errors, errors
    stages = {v.version: v.stage for v in registries[0].models("digits")}
    assert list(stages.values()).count("production") == 1 and set(stages.values()) == {"production", "archived"}
    for registry in registries:
        registry.close()


def test_a_promotion_waits_for_one_in_flight_and_archives_it(database, tmp_path, monkeypatch):
    """The race the locks close, made deterministic: one promotion's transaction is held open
    while a second one starts. Without the lock the second would not see the first's
    uncommitted production version, and both would end up in production."""
    from sqlalchemy import select

    from stoker.cluster.registry import ModelVersion, _set_stage

    monkeypatch.setenv("STOKER_REGISTRY_URL", database)
    run_id = record(fake_run_dir(tmp_path), "succeeded")
    first, second = Registry(database), Registry(database)
    for _ in range(2):
        first.register_model(run_id, "digits", new_version=True)
    waiter = threading.Thread(target=lambda: second.set_stage("digits", 2, "production"))
    with first.session() as session:
        version_1 = session.scalars(select(ModelVersion).where(ModelVersion.version == 1)).one()
        _set_stage(session, version_1, "production")
        session.flush()
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive(), "the second promotion did not wait for the first to commit"
    waiter.join(timeout=30)
    assert {v.version: v.stage for v in first.models("digits")} == {1: "archived", 2: "production"}


def test_eight_processes_open_a_fresh_database_and_record_at_once(database, tmp_path):
    """The SQLite race test's crowd on PostgreSQL: eight interpreters create the schema (under
    the advisory lock) and record a run each, released together."""
    from tests.cluster.test_registry_concurrency import assert_each_recorded_once, race

    assert_each_recorded_once(database, race(database, tmp_path / "barrier"))


def test_a_database_that_refuses_the_schema_is_named_with_its_own_message(postgres, database, capsys):
    """A role without CREATE on the database's schema (PostgreSQL 15's default for anyone but
    the owner): the error names the URL and PostgreSQL's reason, blames no lock, exits 2."""
    from stoker.cluster.registry import RegistryUnavailable
    from stoker.errors import UserError

    with psycopg.connect(postgres["admin"], autocommit=True) as connection:
        connection.execute("DROP ROLE IF EXISTS reader")
        connection.execute("CREATE ROLE reader LOGIN")
    name = database.rsplit("/", 1)[1]
    with psycopg.connect(postgres["admin"].replace("dbname=postgres", f"dbname={name}"), autocommit=True) as connection:
        connection.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # explicit, whatever the version
    url = database.replace("//stoker@", "//reader@")
    with pytest.raises(UserError) as refused:
        Registry(url)
    assert not isinstance(refused.value, RegistryUnavailable)
    assert str(refused.value) == (
        f"cluster.registry.url: the database at {url} refused the registry's schema: permission denied for schema public")
    assert main(["runs", "list", "--registry", url]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"stoker: error: {refused.value}"
