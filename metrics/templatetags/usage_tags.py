"""`{% load usage_tags %}`: `user|may_see_usage`, whether to show the link to the usage reports (one query for a
user who is not staff; put it after `user.is_staff or` so staff cost none)."""

from django import template

from metrics import usage

register = template.Library()


@register.filter
def may_see_usage(user) -> bool:
    return usage.may_see_usage(user)
