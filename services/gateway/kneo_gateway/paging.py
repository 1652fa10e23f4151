"""The one rule for list parameters on the Kneo face (DECISIONS "Lists")."""

from __future__ import annotations

from kneo_events.errors import InvalidRequest

SORT_ORDERS = ("asc", "desc")
MAX_OFFSET = 1_000_000_000


def page_params(
    limit: int | None, offset: int, sort_by: str, sort_order: str, fields: tuple[str, ...], cap: int
) -> int:
    """Validate paging parameters (400 ``invalid_request``) and return the limit used (clamped to ``cap``).

    Negative ``limit``/``offset``, an ``offset`` past 10^9, an unknown ``sort_by`` or a ``sort_order`` other than
    asc/desc are refused; a ``limit`` over the cap (``KNEO_SERV_MAX_LIST_ITEMS``) is clamped, ``None`` means the cap.
    """
    if (limit is not None and limit < 0) or offset < 0:
        raise InvalidRequest("limit and offset must not be negative")
    if offset > MAX_OFFSET:
        raise InvalidRequest(f"offset must be at most {MAX_OFFSET}", field="offset")
    if sort_by not in fields:
        raise InvalidRequest(f"unknown sort_by {sort_by!r}", allowed=list(fields))
    if sort_order not in SORT_ORDERS:
        raise InvalidRequest("sort_order must be asc or desc", allowed=list(SORT_ORDERS))
    return cap if limit is None else min(limit, cap)
