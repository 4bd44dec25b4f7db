"""A workflow's variables: the small schema staff write when they register it, and a run's values checked by it.

The schema is a list of {"name", "type" (string, integer, boolean, choice), "default", "required", "secret",
"choices", "help"}. validate_schema() checks one and gives it back whole (every key present); clean_variables()
checks the values a run is given and splits them into the public ones (stored, audited, shown) and the secret
ones (stored encrypted, masked in every output). Both raise ValidationError with messages for the person who
wrote the schema or the values: the pages show them by field, the API answers them with 400.

Names are Ansible variable names. Those starting with `ansible_` or `portal_` are refused: a run's values are
Ansible extra vars, which win over everything, and would otherwise choose how (and whether) hosts are reached.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError

TYPES = ("string", "integer", "boolean", "choice")
KEYS = ("name", "type", "default", "required", "secret", "choices", "help")
MAX_VARIABLES = 50
MAX_STRING = 10000  # characters of one value
MAX_HELP = 500
MAX_CHOICES = 100
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RESERVED_PREFIXES = ("ansible_", "portal_")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _name_problem(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        return "a variable name is letters, digits and underscores (not starting with a digit), at most 63"
    if name.lower().startswith(_RESERVED_PREFIXES):
        return f"{name}: names starting with ansible_ or portal_ are the portal's and Ansible's own"
    if keyword.iskeyword(name) or name in ("hostvars", "groups", "inventory_hostname", "omit", "environment"):
        return f"{name}: a name Ansible keeps for itself"
    return ""


def _coerce(var: Mapping[str, Any], value: object) -> Any:
    """`value` as the variable's type; ValueError with the reason."""
    kind = var["type"]
    if kind in ("string", "choice"):
        if not isinstance(value, str):
            raise ValueError("must be text")
        if "\x00" in value:
            raise ValueError("must not hold a NUL character")
        if len(value) > MAX_STRING:
            raise ValueError(f"at most {MAX_STRING} characters")
        if kind == "choice" and value not in var["choices"]:
            raise ValueError("must be one of: " + ", ".join(var["choices"]))
        return value
    if kind == "integer":
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,18}\s*", value):
            number = int(value)
        else:
            raise ValueError("must be a whole number")
        if abs(number) > 10**18:
            raise ValueError("is too large")
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("must be true or false")
    raise ValueError(f"has an unknown type {kind!r}")


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def validate_schema(schema: object) -> list[dict[str, Any]]:
    """The schema checked and normalised (each entry with every key of KEYS); ValidationError listing every
    problem, each naming its variable."""
    if schema is None:
        return []
    if not isinstance(schema, list | tuple):
        raise ValidationError("The variables are a list of {name, type, …} entries.")
    if len(schema) > MAX_VARIABLES:
        raise ValidationError(f"At most {MAX_VARIABLES} variables.")
    errors: list[str] = []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(schema, start=1):
        if not isinstance(entry, Mapping):
            errors.append(f"Variable {i}: an entry is an object with a name and a type.")
            continue
        label = str(entry.get("name", f"#{i}"))[:63]
        unknown = sorted(str(k) for k in entry if k not in KEYS)
        if unknown:
            errors.append(f"{label}: unknown keys {', '.join(unknown)} (known: {', '.join(KEYS)}).")
            continue
        problem = _name_problem(entry.get("name"))
        if problem:
            errors.append(f"Variable {i}: {problem}.")
            continue
        name = entry["name"]
        if name in seen:
            errors.append(f"{name}: named twice.")
            continue
        seen.add(name)
        kind = entry.get("type", "string")
        if kind not in TYPES:
            errors.append(f"{name}: the type is one of {', '.join(TYPES)}.")
            continue
        required, secret = entry.get("required", False), entry.get("secret", False)
        if not isinstance(required, bool) or not isinstance(secret, bool):
            errors.append(f"{name}: required and secret are true or false.")
            continue
        help_text = entry.get("help", "") or ""
        if not isinstance(help_text, str) or len(help_text) > MAX_HELP:
            errors.append(f"{name}: the help is text of at most {MAX_HELP} characters.")
            continue
        choices = entry.get("choices") or []
        if kind == "choice":
            if (
                not isinstance(choices, list | tuple)
                or not choices
                or len(choices) > MAX_CHOICES
                or not all(isinstance(c, str) and c and len(c) <= 200 for c in choices)
                or len(set(choices)) != len(choices)
            ):
                errors.append(f"{name}: a choice lists its choices, 1 to {MAX_CHOICES} distinct texts.")
                continue
        elif choices:
            errors.append(f"{name}: only a choice has choices.")
            continue
        if secret and kind != "string":
            # A masked "1" or "true" would blank every count and flag in the output: secrets are text.
            errors.append(f"{name}: only a string variable may be secret.")
            continue
        var: dict[str, Any] = {
            "name": name,
            "type": kind,
            "default": None,
            "required": required,
            "secret": secret,
            "choices": list(choices),
            "help": help_text,
        }
        default = entry.get("default")
        if not _empty(default):
            if secret:
                errors.append(f"{name}: a secret has no default (it would be stored in clear with the workflow).")
                continue
            try:
                var["default"] = _coerce(var, default)
            except ValueError as e:
                errors.append(f"{name}: the default {e}.")
                continue
        out.append(var)
    if errors:
        raise ValidationError(errors)
    return out


def clean_variables(schema: object, data: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's values checked against the workflow's schema: (public values, secret values). Unknown names
    are refused, values are made their type, choices and required ones enforced, and a variable left empty
    takes its default (or stays out of the run). ValidationError({name: message}) for every field wrong."""
    variables = validate_schema(schema)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValidationError("The variables are an object of name: value.")
    known = {v["name"] for v in variables}
    errors: dict[str, list[str]] = {}
    for name in data:
        if name not in known:
            shown = str(name)[:63]
            errors[shown] = [
                f"{shown} is not a variable of this workflow (it takes: {', '.join(sorted(known)) or 'none'})."
            ]
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for var in variables:
        name = var["name"]
        value = data.get(name)
        if _empty(value):
            if var["default"] is not None:
                public[name] = var["default"]
            elif var["required"]:
                errors[name] = [f"{name} is required."]
            continue
        try:
            cleaned = _coerce(var, value)
        except ValueError as e:
            errors[name] = [f"{name} {e}."]
            continue
        (secret if var["secret"] else public)[name] = cleaned
    if errors:
        raise ValidationError(errors)
    return public, secret
