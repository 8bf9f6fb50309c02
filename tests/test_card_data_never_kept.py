"""After the whole suite: no full card number in any log or any table.

Every test that pays sends its card through the app, so by now the app logs (in-process and
live servers), FakePay's log and the database hold whatever the app would ever keep.
"""

import re
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from tests.support import direct_engine

# 16 digits, alone or grouped by spaces or dashes, not part of a longer hex run or a UUID.
CARD_NUMBER = re.compile(
    r"(?<![0-9a-fA-F-])\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}(?![0-9a-fA-F]|-[0-9a-fA-F])"
)
USED_IN_TESTS = ["1234567812345678", "1234565678225678", "4111111111111111"]

pytestmark = pytest.mark.after_everything


def log_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(tmp_path_factory.getbasetemp().rglob("*.log"))


def database_dump() -> str:
    lines = []
    with direct_engine.connect() as connection:
        for table in inspect(direct_engine).get_table_names():
            for row in connection.execute(text(f"SELECT * FROM `{table}`")):
                lines.append(" ".join(str(value) for value in row))
    return "\n".join(lines)


def test_the_suite_left_logs_to_inspect(tmp_path_factory: pytest.TempPathFactory) -> None:
    names = {path.parent.name.rstrip("0123456789") for path in log_files(tmp_path_factory)}

    assert {"inprocess", "fakepay", "live"} <= names


def test_no_log_holds_a_card_number(tmp_path_factory: pytest.TempPathFactory) -> None:
    for path in log_files(tmp_path_factory):
        content = path.read_text(errors="replace")
        assert CARD_NUMBER.findall(content) == [], path
        for number in USED_IN_TESTS:
            assert number not in content, path


def test_no_table_holds_a_card_number() -> None:
    dump = database_dump()

    assert "123456********5678" in dump  # payments were recorded, masked
    assert CARD_NUMBER.findall(dump) == []
    for number in USED_IN_TESTS:
        assert number not in dump
