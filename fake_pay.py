"""FakePay: a stand-in for an external card payment provider.

Standard library only, single-threaded like the provider it imitates, so it can run anywhere
with `python fake_pay.py [PORT]` (or `FAKEPAY_PORT`); the default port is 9000.

Each request is checked in a fixed order and the first failing rule answers 400 with
`{"error": ..., "reason": ...}`; a request that passes every rule answers 200. One JSON line
per request goes to stdout, with the card number masked, so tests can see what arrived.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

DEFAULT_PORT = 9000
PAYMENT_PATH = "/fakepay"

UUID_PATTERN = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
PAN_PATTERN = re.compile(r"[0-9]{16}")
EXPIRY_PATTERN = re.compile(r"(0[1-9]|1[0-2])-[0-9]{4}")
NAME_PATTERN = re.compile(r"[A-Za-z ]+")


class PaymentRejectedError(Exception):
    """A rule the request broke; its reply body is `{"error": error, "reason": reason}`."""

    def __init__(self, reason: str, error: str = "payment failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def check_payment(raw_body: bytes) -> dict[str, Any]:
    """Apply FakePay's rules in order; return the parsed body or raise for the first broken one."""
    try:
        body = json.loads(raw_body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise PaymentRejectedError(str(exc), error="Invalid JSON payload") from exc
    if not isinstance(body, dict):
        raise PaymentRejectedError(
            "Incorrect body format supplied, I need to extract dict from json"
        )
    if "transactionId" not in body:
        raise PaymentRejectedError("Missing transactionId")
    card = body.get("card")
    if not isinstance(card, dict):
        raise PaymentRejectedError("Missing Card Object")
    if not _matches(UUID_PATTERN, body["transactionId"]):
        raise PaymentRejectedError("Invalid transactionId. It must match UUID")
    if not _matches(PAN_PATTERN, card.get("number")):
        raise PaymentRejectedError("Invalid card pan. It must be a 16-digit number.")
    if not _matches(EXPIRY_PATTERN, card.get("expiry")):
        raise PaymentRejectedError("Invalid card expiry. It must be in MM-YYYY format.")
    if not _matches(NAME_PATTERN, card.get("name")):
        raise PaymentRejectedError("Invalid card name. It must contain only letters and spaces.")
    return body


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def mask_pan(number: object) -> object:
    """First six and last four digits of a 16-digit number; anything else fully starred."""
    if not isinstance(number, str):
        return number if number is None else "****"
    if PAN_PATTERN.fullmatch(number):
        return f"{number[:6]}{'*' * 8}{number[-4:]}"
    return "*" * len(number)


def loggable(raw_body: bytes) -> object:
    """The request body as it may be logged: parsed JSON with any card number masked."""
    try:
        body = json.loads(raw_body)
    except ValueError:
        return {"unparsable_bytes": len(raw_body)}
    if isinstance(body, dict) and isinstance(body.get("card"), dict) and "number" in body["card"]:
        body["card"] = {**body["card"], "number": mask_pan(body["card"]["number"])}
    return body


class FakePayHandler(BaseHTTPRequestHandler):
    server_version = "FakePay/1.0"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length)
        if self.path != PAYMENT_PATH:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"}, raw_body)
            return
        try:
            check_payment(raw_body)
        except PaymentRejectedError as rejected:
            reply = {"error": rejected.error, "reason": rejected.reason}
            self._reply(HTTPStatus.BAD_REQUEST, reply, raw_body)
            return
        self._reply(HTTPStatus.OK, {"message": "Payment processed successfully"}, raw_body)

    def do_GET(self) -> None:
        self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"}, b"")

    def _reply(self, status: HTTPStatus, payload: dict[str, str], raw_body: bytes) -> None:
        encoded = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "method": self.command,
            "path": self.path,
            "status": int(status),
            "reply": payload,
            "request": loggable(raw_body) if raw_body else None,
        }
        print(json.dumps(entry), flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default access log: it is replaced by the JSON line in `_reply`."""


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FAKEPAY_PORT", DEFAULT_PORT))
    server = HTTPServer(("127.0.0.1", port), FakePayHandler)
    print(f"FakePay listening on http://127.0.0.1:{port}{PAYMENT_PATH}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
