"""The tests' throwaway PostgreSQL cluster: an unprivileged server on loopback, one database per test."""

from __future__ import annotations

import os
import pwd
import socket

import psycopg


def test_the_server_runs_unprivileged_on_loopback_only(pg_cluster, postgres_url):
    with psycopg.connect(postgres_url) as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        port = int(conn.execute("SHOW port").fetchone()[0])
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    assert listen == "127.0.0.1" and port == pg_cluster.port and superuser
    owner = pg_cluster.server_user()
    assert pwd.getpwnam(owner).pw_uid != 0
    assert owner == (pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() else "postgres")
    with socket.socket() as other:  # nothing answers on another address
        other.settimeout(2)
        assert other.connect_ex(("127.0.0.2", pg_cluster.port)) != 0


def test_a_wrong_password_is_refused(pg_cluster):
    url = pg_cluster.url().replace(pg_cluster.password, "not-the-password")
    try:
        psycopg.connect(url).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
    else:
        raise AssertionError("a wrong password was accepted")


def test_each_test_gets_an_empty_database_of_its_own(pg_cluster, postgres_url):
    other = pg_cluster.create_database()
    try:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x integer)")
        with psycopg.connect(other) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        assert tables == 0
    finally:
        pg_cluster.drop_database(other)
    with psycopg.connect(pg_cluster.url()) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (other.rsplit("/", 1)[1],)
        ).fetchone()[0] == 0
