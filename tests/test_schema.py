"""The SQLModel tables and the schema sql/up.sql creates must not drift apart."""

import re
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.dialects import mysql
from sqlmodel import SQLModel

import models  # noqa: F401  (registers the tables)
from tests.support import direct_engine

TABLES = sorted(SQLModel.metadata.tables)


def type_name(sql_type: Any) -> str:
    """Compiled MySQL type without integer display widths, which MariaDB adds on reflection."""
    compiled = str(sql_type.compile(dialect=mysql.dialect())).upper()
    compiled = re.sub(r"^(TINYINT|SMALLINT|MEDIUMINT|INTEGER|INT|BIGINT)\(\d+\)$", r"\1", compiled)
    return "INTEGER" if compiled == "INT" else compiled


def test_models_and_up_sql_define_the_same_tables() -> None:
    assert sorted(inspect(direct_engine).get_table_names()) == TABLES


@pytest.mark.parametrize("table", TABLES)
def test_columns_match_types_and_nullability(table: str) -> None:
    live = {column["name"]: column for column in inspect(direct_engine).get_columns(table)}
    declared = SQLModel.metadata.tables[table].columns

    assert sorted(live) == sorted(column.name for column in declared)
    for column in declared:
        assert type_name(live[column.name]["type"]) == type_name(column.type), column.name
        assert live[column.name]["nullable"] == column.nullable, column.name


@pytest.mark.parametrize("table", TABLES)
def test_primary_and_foreign_keys_match(table: str) -> None:
    inspector = inspect(direct_engine)
    declared = SQLModel.metadata.tables[table]

    live_pk = inspector.get_pk_constraint(table)["constrained_columns"]
    assert live_pk == [column.name for column in declared.primary_key.columns]
    live_fks = {
        (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
        for fk in inspector.get_foreign_keys(table)
    }
    declared_fks = {
        ((fk.parent.name,), fk.column.table.name, (fk.column.name,)) for fk in declared.foreign_keys
    }
    assert live_fks == declared_fks


def test_invoice_has_indexes_for_newest_first_listing() -> None:
    indexes = {
        index["name"]: index["column_names"]
        for index in inspect(direct_engine).get_indexes("invoice")
    }

    assert indexes["ix_invoice_created"] == ["created_at", "id"]
    assert indexes["ix_invoice_status_created"] == ["invoice_status", "created_at", "id"]


def test_invoice_has_an_index_for_each_customer_filter_order() -> None:
    indexes = {
        index["name"]: index["column_names"]
        for index in inspect(direct_engine).get_indexes("invoice")
    }

    assert indexes["ix_invoice_customer_created"] == ["customer_id", "created_at", "id"]
    assert indexes["ix_invoice_customer_status_created"] == [
        "customer_id",
        "invoice_status",
        "created_at",
        "id",
    ]


def test_customer_email_is_unique_whatever_its_case() -> None:
    (index,) = [
        index
        for index in inspect(direct_engine).get_indexes("customer")
        if index["column_names"] == ["customer_email"]
    ]
    (email,) = [
        column
        for column in inspect(direct_engine).get_columns("customer")
        if column["name"] == "customer_email"
    ]

    assert index["unique"]
    assert type_name(email["type"]).endswith("_CI")
