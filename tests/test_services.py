"""The registry's test services are real: SQLAlchemy talks to PostgreSQL, fsspec talks to moto's S3 over HTTP."""

from __future__ import annotations

import fsspec
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError


def test_postgres_select_and_table(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg://")
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
            conn.execute(text("create table models (id serial primary key, name text not null)"))
            conn.execute(text("insert into models (name) values ('mlp'), ('cnn')"))
        with engine.connect() as conn:
            assert conn.execute(text("select name from models order by id")).scalars().all() == ["mlp", "cnn"]
            assert conn.execute(text("select version()")).scalar_one().startswith("PostgreSQL")
    finally:
        engine.dispose()


def test_postgres_databases_are_isolated(postgres_server, postgres_url):
    other_url = postgres_server.create_database("isolation_other")
    try:
        first, other = create_engine(postgres_url), create_engine(other_url)
        with first.begin() as conn:
            conn.execute(text("create table only_here (x int)"))
        with other.connect() as conn:
            with pytest.raises(ProgrammingError, match="only_here"):
                conn.execute(text("select * from only_here"))
        first.dispose()
        other.dispose()
    finally:
        postgres_server.drop_database("isolation_other")


def test_postgres_fresh_database_per_test(postgres_url):
    engine = create_engine(postgres_url)
    with engine.connect() as conn:  # the table of the test above is not here
        tables = conn.execute(text("select tablename from pg_tables where schemaname = 'public'")).all()
    engine.dispose()
    assert tables == []


def test_s3_write_read_list(s3_bucket):
    root, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    with fs.open(f"{root}/models/mlp/1/model.onnx", "wb") as f:
        f.write(b"\x08\x08onnx-bytes")
    assert fs.cat(f"{root}/models/mlp/1/model.onnx") == b"\x08\x08onnx-bytes"
    assert fs.ls(f"{root}/models/mlp/1", detail=False) == [f"{root[5:]}/models/mlp/1/model.onnx"]
    assert fs.exists(f"{root}/models/mlp/1/model.onnx")
    with fsspec.open(f"{root}/models/mlp/1/model.onnx", "rb", **options) as f:  # the URL form the registry uses
        assert f.read() == b"\x08\x08onnx-bytes"
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{root}/models/missing.onnx")


def test_s3_buckets_are_fresh(s3_bucket):
    root, options = s3_bucket
    fs = fsspec.filesystem("s3", **options, skip_instance_cache=True)
    assert fs.ls(root, detail=False) == []
