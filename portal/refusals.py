"""The base of every error a service raises to say no: a request it will not carry out (a wrong state,
an object still in use, a console it will not open). The audit trail records these as "refused", and
anything else a service raises as "failed"; views and the API answer them with a message, never a 500."""


class Refusal(Exception):
    """A service's "no", with a message for the person who asked."""
