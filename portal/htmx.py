from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def is_partial(request: HtmxHttpRequest) -> bool:
    """An htmx request for a fragment (boosted navigation wants the full page)."""
    return bool(request.htmx) and not request.htmx.boosted
