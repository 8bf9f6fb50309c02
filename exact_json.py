"""Request bodies parsed so that JSON numbers keep their exact written value.

`json.loads` turns `100.0000000000000001` into the float `100.0` before any validation can see
it, so an amount with too many decimals would be rounded silently. Parsed with
`parse_float=Decimal`, every JSON number with a fraction or exponent reaches the models as the
`Decimal` of its text, and `amount`'s two-decimal rule judges what the client wrote.
"""

import json
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class ExactJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=Decimal)
        return self._json


class ExactJSONRoute(APIRoute):
    """Every route of the app that takes a body reads it through `ExactJSONRequest`; the
    others (every GET) keep FastAPI's handler as it is, with no wrapper on their hot path."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def exact_json_handler(request: Request) -> Response:
            return await handler(ExactJSONRequest(request.scope, request.receive))

        return exact_json_handler
