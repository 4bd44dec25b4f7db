from django.core.exceptions import ValidationError


def add_errors(form, error: ValidationError, aliases: dict | None = None) -> None:
    """Put a service's ValidationError on the form: per field where the form has it (under its own name,
    or the form's name for it in `aliases`), else on the form."""
    by_field = error.error_dict if hasattr(error, "error_dict") else {None: error.error_list}
    for field, messages in by_field.items():
        field = (aliases or {}).get(field, field)
        form.add_error(field if field in form.fields else None, messages)
