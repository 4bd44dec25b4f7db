"""The user's own account: password, API tokens, SSH keys."""

from datetime import datetime, timedelta

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login, password_validation
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from portal import audit, keysources, sshkeys
from portal.models import ApiToken, SshKey


class SshKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    public_key = forms.CharField(label="Public key", widget=forms.Textarea(attrs={"rows": 3}), required=False)
    source = forms.CharField(
        label="Or fetch the keys from",
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "gh:<user>, lp:<user> or https://…/<user>.keys"}),
        help_text="The worker fetches them now and again when you press Refresh.",
    )

    def clean_public_key(self) -> str:
        if not self.cleaned_data["public_key"].strip():
            return ""
        try:
            return sshkeys.validate_ssh_key(self.cleaned_data["public_key"].strip())
        except sshkeys.InvalidSSHKey as e:
            raise ValidationError(str(e)) from None

    def clean_source(self) -> str:
        if not self.cleaned_data["source"].strip():
            return ""
        try:
            return keysources.validate_source(self.cleaned_data["source"])
        except sshkeys.InvalidKeySource as e:
            raise ValidationError(str(e)) from None

    def clean(self):
        data = super().clean() or {}
        if self.errors:
            return data
        if data.get("public_key") and data.get("source"):
            self.add_error("source", "Paste a key or name a source, not both.")
        elif not data.get("public_key") and not data.get("source"):
            self.add_error("public_key", "Paste a public key, or name a source to fetch keys from.")
        return data


class TokenForm(forms.Form):
    EXPIRY_DAYS = [("", "never"), ("1", "1 day"), ("7", "7 days"), ("30", "30 days"), ("90", "90 days")]
    EXPIRY_DAYS += [("365", "1 year")]

    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. terraform on my laptop.")
    expires = forms.TypedChoiceField(
        label="Expires after", choices=EXPIRY_DAYS, coerce=int, empty_value=None, required=False
    )
    read_only = forms.BooleanField(label="Read-only (GET, HEAD and OPTIONS only)", required=False)

    def expires_at(self) -> datetime | None:
        days = self.cleaned_data["expires"]
        return timezone.now() + timedelta(days=days) if days else None


def _described(key: SshKey) -> list[sshkeys.KeyInfo]:
    """Each key of the row as ssh-keygen -l shows it (a line that no longer validates is left out)."""
    infos = []
    for line in key.public_key.splitlines():
        try:
            infos.append(sshkeys.describe(line))
        except sshkeys.InvalidSSHKey:
            continue
    return infos


def _page(request, **extra) -> HttpResponse:
    context = {
        "tokens": request.user.api_tokens.all(),
        "keys": [
            {"key": key, "infos": _described(key), "failed": keysources.last_fetch_failed(key)}
            for key in request.user.ssh_keys.all()
        ],
        "key_form": SshKeyForm(),
        "token_form": TokenForm(),
        **extra,
    }
    return render(request, "portal/account.html", context)


@login_required
@require_GET
def account(request) -> HttpResponse:
    return _page(request)


@login_required
@require_POST
def token_create(request) -> HttpResponse:
    form = TokenForm(request.POST)
    if not form.is_valid():
        return _page(request, token_form=form)
    token, raw = ApiToken.issue(
        user=request.user,
        name=form.cleaned_data["name"],
        expires_at=form.expires_at(),
        read_only=form.cleaned_data["read_only"],
    )
    scope = "read-only" if token.read_only else "read-write"
    expiry = f"expires {token.expires_at:%Y-%m-%d %H:%M} UTC" if token.expires_at else "no expiry"
    audit.record("api_token.create", token, request=request, detail=f"{scope}, {expiry}")
    # Shown once, in this response only; the page sends no-store so it is not cached.
    response = _page(request, new_token=raw)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_revoke(request, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)
    token.delete()  # recorded (api_token.revoke) by portal.audit, like a deletion in the admin
    messages.success(request, f"Token {token.prefix}… revoked.")
    return redirect("account")


@login_required
@require_POST
def key_add(request) -> HttpResponse:
    form = SshKeyForm(request.POST)
    if not form.is_valid():
        return _page(request, key_form=form)
    try:
        key = keysources.ssh_key_add(user=request.user, **form.cleaned_data)
    except IntegrityError:
        form.add_error("name", "You already have a key with that name.")
        return _page(request, key_form=form)
    except keysources.KeySourceRefused as e:
        form.add_error("source", str(e))
        return _page(request, key_form=form)
    audit.record("ssh_key.add", key, request=request, detail=f"source={key.source}" if key.source else "")
    if key.source:
        messages.success(request, f"Keys of {key.name} queued for fetching from {key.source}; new machines get them.")
    else:
        messages.success(request, f"Key {key.name} added; new machines get it by default.")
    return redirect("account")


@login_required
@require_POST
def key_refresh(request, pk: int) -> HttpResponse:
    key = get_object_or_404(SshKey, pk=pk, user=request.user)
    try:
        keysources.ssh_key_refresh(key=key)
    except keysources.KeySourceRefused as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"Fetching the keys of {key.name} again from {key.source}.")
    return redirect("account")


@login_required
@require_POST
def key_delete(request, pk: int) -> HttpResponse:
    key = get_object_or_404(SshKey, pk=pk, user=request.user)
    audit.record("ssh_key.delete", key, request=request)
    key.delete()
    messages.success(request, f"Key {key.name} removed (machines that have it keep it).")
    return redirect("account")


class SignupForm(forms.Form):
    username = forms.CharField(max_length=150)
    password1 = forms.CharField(label="Password", widget=forms.PasswordInput)
    password2 = forms.CharField(label="Password again", widget=forms.PasswordInput)

    def clean_username(self) -> str:
        name = self.cleaned_data["username"]
        User = get_user_model()
        User.username_validator(name)
        if User.objects.filter(username__iexact=name).exists():
            raise ValidationError("That user name is taken.")
        return name

    def clean(self):
        super().clean()
        data = self.cleaned_data  # what Form.clean() returns, typed as never None
        if data.get("password1") != data.get("password2"):
            self.add_error("password2", "The two passwords differ.")
        elif data.get("password1"):
            try:
                password_validation.validate_password(
                    data["password1"], get_user_model()(username=data.get("username") or "")
                )
            except ValidationError as e:
                self.add_error("password1", e)
        return data


def signup(request) -> HttpResponse:
    """Self-registration, only where PORTAL_SELF_REGISTRATION is on (it is off by default)."""
    if not settings.PORTAL_SELF_REGISTRATION:
        raise Http404("Self-registration is off; ask staff for an account.")
    if request.user.is_authenticated:
        return redirect("home")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = get_user_model().objects.create_user(
            form.cleaned_data["username"], password=form.cleaned_data["password1"]
        )
        audit.record("user.signup", user, request=request, user=user)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")  # the throttle is no backend
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})
