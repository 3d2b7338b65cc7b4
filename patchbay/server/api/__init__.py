"""The REST API under /api/v1: what the console shows and does, behind scoped tokens, every change audited.

`endpoints.py` is the table of every route; `router.py` authenticates, checks scopes and validates;
one module per resource holds its handlers (`flows.py`, `runs.py`, `dead_letters.py`, ...).
"""

from __future__ import annotations

from patchbay.server.api.http import ApiError
from patchbay.server.api.router import Api, add_api

__all__ = ["Api", "ApiError", "add_api"]
