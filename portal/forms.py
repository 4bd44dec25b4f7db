from django.core.exceptions import ValidationError


def add_errors(form, error: ValidationError) -> None:
    """Put a service's ValidationError on the form: per field where the form has it, else on the form."""
    for field, messages in getattr(error, "error_dict", {None: error.error_list}).items():
        form.add_error(field if field in form.fields else None, messages)
