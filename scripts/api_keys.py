"""API keys for `make api-key`, `make api-key-revoke` and `make api-keys`.

    python -m scripts.api_keys create NAME read|write   # the secret, once, on the last line
    python -m scripts.api_keys revoke NAME
    python -m scripts.api_keys list

They act on the database of DB_URL. The secret is printed once and stored only as SHA-256.
"""

import argparse
import sys

import pymysql

from auth import display_prefix, new_secret, secret_hash
from models import ApiKeyScope
from scripts.schema import admin_connection
from settings import Settings


def create(config: Settings, name: str, scope: ApiKeyScope) -> str:
    secret = new_secret()
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        try:
            cursor.execute(
                "INSERT INTO api_key (name, scope, secret_hash, prefix) VALUES (%s, %s, %s, %s)",
                (name, scope.value, secret_hash(secret), display_prefix(secret)),
            )
        except pymysql.err.IntegrityError:
            raise SystemExit(f"An API key named {name} already exists; pick another name") from None
    return secret


def revoke(config: Settings, name: str) -> None:
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute(
            "UPDATE api_key SET revoked_at = NOW(6) WHERE name = %s AND revoked_at IS NULL",
            (name,),
        )
        if cursor.rowcount == 0:
            raise SystemExit(f"No active API key is named {name}")


def listing(config: Settings) -> list[tuple[object, ...]]:
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, scope, prefix, created_at, last_used_at, revoked_at "
            "FROM api_key ORDER BY id"
        )
        return list(cursor.fetchall())


def main() -> None:
    parser = argparse.ArgumentParser(description="API keys in the database of DB_URL")
    actions = parser.add_subparsers(dest="action", required=True)
    made = actions.add_parser("create", help="make a key and print its secret once")
    made.add_argument("name")
    made.add_argument("scope", choices=[scope.value for scope in ApiKeyScope])
    actions.add_parser("revoke", help="stop a key working (within seconds)").add_argument("name")
    actions.add_parser("list", help="every key, without secrets")
    arguments = parser.parse_args()
    config = Settings()
    if arguments.action == "create":
        secret = create(config, arguments.name, ApiKeyScope(arguments.scope))
        print(f"API key {arguments.name} ({arguments.scope}) created. Its secret, shown only")
        print("now; send it as `Authorization: Bearer <secret>`:", file=sys.stdout)
        print(secret)
    elif arguments.action == "revoke":
        revoke(config, arguments.name)
        print(f"API key {arguments.name} revoked; it stops working within 5 seconds")
    else:
        print(f"{'name':24} {'scope':6} {'prefix':12} {'created':19} {'last used':19} revoked")
        for name, scope, prefix, created, used, revoked in listing(config):
            print(
                f"{name!s:24} {scope!s:6} {prefix!s:12} {created!s:.19} {used or '-'!s:.19} "
                f"{revoked or '-'!s:.19}"
            )


if __name__ == "__main__":
    main()
