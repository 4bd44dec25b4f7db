from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """DRF's limit and offset, with the limit capped: DRF passes any `?limit=` to the database as it is, and one
    past SQLite's 64-bit integers (`?limit=9703798707753448432388276224`, found by the API fuzzer) failed the
    query with a 500. A larger limit gets MAX_LIMIT rows; an offset past the end never reaches the database
    (DRF answers an empty page first)."""

    max_limit = 1000
