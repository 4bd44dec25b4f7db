"""The API's JSON body parser: DRF's, with a bound on nesting. Python's json decoder recurses per level, so
`[[[[...]]]]` thousands deep raised RecursionError (a 500) before any view ran; and a body that decodes but
nests hundreds deep would recurse again in whatever walks it (validation, the JSON columns' encoder)."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError

# No request of the API nests deeper than 5 levels (a machine's NICs, an extra disk's fields); 32 leaves room.
MAX_DEPTH = 32
TOO_DEEP = f"JSON parse error - nested deeper than {MAX_DEPTH} levels."


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)  # its ValueErrors are ParseErrors
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if _deeper_than(data, MAX_DEPTH):
            raise ParseError(TOO_DEEP)
        return data


def _deeper_than(data, limit: int) -> bool:
    """Whether `data` nests lists and objects more than `limit` deep; a loop, not recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False
