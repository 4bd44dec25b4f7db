"""The error answers of the API, in its OpenAPI schema (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]).

drf-spectacular documents only the success answer of each operation, but DRF answers every request that fails
authentication with 401, a refused permission with 403, an object that the user may not see with 404 and bad
input with 400, whatever the view. They are added here to every operation they can come from, so the schema
says what a client gets (and the API fuzzer, tests/test_api_fuzz.py, holds the portal to it). Answers that
only some views give (409 for a busy or protected machine) are declared on those views.
"""

from typing import Any

DETAIL = "ErrorDetail"
VALIDATION = "ValidationErrors"

COMPONENTS: dict[str, dict[str, Any]] = {
    DETAIL: {
        "type": "object",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    },
    # DRF's validation errors: messages per field (lists, or nested for lists of objects such as NICs), or a
    # list of messages that belong to no field.
    VALIDATION: {
        "oneOf": [
            {"type": "object", "additionalProperties": True},
            {"type": "array", "items": {"type": "string"}},
        ],
    },
}

METHODS = ("get", "put", "post", "patch", "delete")


def _answer(description: str, component: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}},
    }


def add_error_responses(result: dict[str, Any], generator, request, public) -> dict[str, Any]:
    """Add 400 (operations with input), 401 and 403 (all), 404 (paths with an object, or a ?format=) where not
    declared."""
    result.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
    for path, item in result.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            query = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
            takes_input = "requestBody" in operation or bool(query)
            # DRF answers 404 for a ?format= that no renderer of the view has.
            has_object = "{" in path or "format" in query
            extra = {
                "400": _answer("Bad input: a message per field.", VALIDATION) if takes_input else None,
                "401": _answer("No valid credentials.", DETAIL),
                "403": _answer("Not allowed for this user.", DETAIL),
                "404": _answer("No such object, or not visible to this user.", DETAIL) if has_object else None,
            }
            for code, answer in extra.items():
                if answer is not None:
                    responses.setdefault(code, answer)
    return result
