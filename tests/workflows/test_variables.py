"""workflows.variables: the schema staff write, and a run's values checked by it (types, choices, required,
unknown names, secrets apart), with a message naming each field."""

import pytest
from django.core.exceptions import ValidationError

from workflows.variables import clean_variables, validate_schema

SCHEMA = [
    {"name": "packages", "type": "string", "required": True, "help": "comma separated"},
    {"name": "count", "type": "integer", "default": 2},
    {"name": "upgrade", "type": "boolean", "default": False},
    {"name": "state", "type": "choice", "choices": ["present", "absent"], "default": "present"},
    {"name": "token", "type": "string", "secret": True},
]


def _messages(e: ValidationError) -> str:
    return " | ".join(e.messages)


def test_a_schema_is_normalised_with_every_key():
    out = validate_schema(SCHEMA)
    assert [v["name"] for v in out] == ["packages", "count", "upgrade", "state", "token"]
    assert out[0] == {
        "name": "packages", "type": "string", "default": None, "required": True, "secret": False, "choices": [],
        "help": "comma separated",
    }  # fmt: skip
    assert out[1]["default"] == 2 and out[2]["default"] is False and out[4]["secret"] is True
    assert validate_schema([]) == [] and validate_schema(None) == []


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"name": "x"}, "a list"),
        ([["x"]], "an object"),
        ([{"name": "1abc"}], "letters, digits and underscores"),
        ([{"name": "ansible_host"}], "ansible_ or portal_"),
        ([{"name": "portal_id"}], "ansible_ or portal_"),
        ([{"name": "hostvars"}], "Ansible keeps"),
        ([{"name": "a"}, {"name": "a"}], "named twice"),
        ([{"name": "a", "type": "list"}], "the type is one of"),
        ([{"name": "a", "colour": "red"}], "unknown keys colour"),
        ([{"name": "a", "type": "choice"}], "lists its choices"),
        ([{"name": "a", "type": "choice", "choices": ["x", "x"]}], "distinct"),
        ([{"name": "a", "choices": ["x"]}], "only a choice has choices"),
        ([{"name": "a", "type": "integer", "secret": True}], "only a string variable may be secret"),
        ([{"name": "a", "secret": True, "default": "hunter2"}], "a secret has no default"),
        ([{"name": "a", "type": "integer", "default": "ten"}], "the default must be a whole number"),
        ([{"name": "a", "type": "choice", "choices": ["x"], "default": "y"}], "must be one of: x"),
        ([{"name": "a", "required": "yes"}], "true or false"),
        ([{"name": f"v{i}"} for i in range(51)], "At most 50"),
    ],
)
def test_bad_schemas_are_refused_with_the_variable_named(schema, message):
    with pytest.raises(ValidationError) as e:
        validate_schema(schema)
    assert message in _messages(e.value)


def test_values_are_coerced_defaulted_and_split_into_public_and_secret():
    public, secret = clean_variables(
        SCHEMA, {"packages": "htop, tmux", "count": "5", "upgrade": "yes", "token": "s3cr3t"}
    )
    assert public == {"packages": "htop, tmux", "count": 5, "upgrade": True, "state": "present"}
    assert secret == {"token": "s3cr3t"}
    public, secret = clean_variables(SCHEMA, {"packages": "vim", "count": 7, "upgrade": False, "state": "absent"})
    assert public == {"packages": "vim", "count": 7, "upgrade": False, "state": "absent"} and secret == {}


def test_every_wrong_field_gets_its_own_message():
    with pytest.raises(ValidationError) as e:
        clean_variables(SCHEMA, {"count": "many", "upgrade": "perhaps", "state": "gone", "colour": "red", "token": 5})
    errors = e.value.message_dict
    assert errors["packages"] == ["packages is required."]
    assert errors["count"] == ["count must be a whole number."]
    assert errors["upgrade"] == ["upgrade must be true or false."]
    assert errors["state"] == ["state must be one of: present, absent."]
    assert errors["token"] == ["token must be text."]
    assert "colour is not a variable of this workflow" in errors["colour"][0]


def test_odd_values_are_refused_not_crashed_on():
    for bad in ({"packages": "a\x00b"}, {"packages": "x" * 10001}, {"packages": "v", "count": True}):
        with pytest.raises(ValidationError):
            clean_variables(SCHEMA, bad)
    with pytest.raises(ValidationError):
        clean_variables(SCHEMA, ["packages"])  # type: ignore[arg-type]
    assert clean_variables([], None) == ({}, {})
