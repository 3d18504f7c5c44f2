"""Single sign-on with OpenID Connect (mozilla-django-oidc), on when OIDC_RP_CLIENT_ID is set.

What the library leaves to us, and why:
- Accounts are linked by (issuer, subject) in SsoIdentity, never looked up by email (verified
  or not): a person at the identity provider who gives themselves a local DBA's address must
  not become that DBA. The first login makes an account of its own (no password: it logs in
  only through SSO), with the address of that login.
- Whether the provider verified that address (email_verified) is kept at every login: four
  eyes tells a local account from a single sign-on one only by a verified address
  (backupportal.roles.same_person).
- The ID token's issuer and audience are checked (the library checks the signature, expiry
  and nonce only), and the userinfo's subject must be the ID token's.
- The roles come from the groups claim through OIDC_ROLE_MAP, at every login: someone removed
  from the group at the provider loses the role at their next login. Other groups are kept.
- A refused login says why on the login page, in one line, and is journaled; the client secret
  and the tokens never reach a message, a log line or the journal.
"""

import logging
import re

import jwt
import requests
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import Group, User
from django.core.exceptions import SuspiciousOperation
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect
from django.utils import timezone
from django.utils.decorators import method_decorator
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView

from backupportal import journal
from backupportal.models import SsoIdentity
from backupportal.roles import ROLES

log = logging.getLogger(__name__)


def enabled():
    return bool(settings.OIDC_RP_CLIENT_ID)


class Refused(Exception):
    """One line for the login page and the journal: why this single sign-on did not log anyone in."""


class SsoBackend(OIDCAuthenticationBackend):
    def authenticate(self, request, **kwargs):
        # Only the callback's call (it passes the nonce): never a password login, whatever its query string.
        if not enabled() or request is None or "nonce" not in kwargs or "password" in kwargs:
            return None
        try:
            return super().authenticate(request, **kwargs)
        except Refused as e:
            return _refuse(request, str(e))
        except requests.RequestException as e:
            # The library's token error carries the provider's answer: a line of it, never the request.
            status = getattr(e.response, "status_code", None)
            return _refuse(request, f"the identity provider did not answer as expected ({status or type(e).__name__})")
        except (SuspiciousOperation, jwt.PyJWTError, ValueError, KeyError, TypeError) as e:
            return _refuse(request, f"the identity provider's answer was refused: {str(e)[:120] or type(e).__name__}")

    def get_user(self, user_id):
        # Asked on every request of a session this backend logged in: an account disabled since
        # loses it at once, as ModelBackend does for password logins (the library does not check).
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None

    def verify_token(self, token, **kwargs):
        payload = super().verify_token(token, **kwargs)
        if not isinstance(payload.get("exp"), (int, float)):  # PyJWT checks an exp only when there is one
            raise Refused("the ID token has no expiry time (exp): the provider must set one")
        if payload.get("iss") != settings.OIDC_ISSUER:
            raise Refused(f"the ID token comes from {str(payload.get('iss'))[:100]!r}, not OIDC_ISSUER")
        audience = payload.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if settings.OIDC_RP_CLIENT_ID not in audiences:
            raise Refused("the ID token was not issued to this portal (its audience is another client)")
        return payload

    def get_or_create_user(self, access_token, id_token, payload):
        claims = self.get_userinfo(access_token, id_token, payload)
        subject = str(payload.get("sub") or "")
        if not subject or str(claims.get("sub") or "") != subject:
            raise Refused("the provider's userinfo names another subject than its ID token")
        with transaction.atomic():
            identity = _identity(payload["iss"], subject, claims)
            user = identity.user
            if not user.is_active:
                raise Refused(f"the account {user.get_username()} is disabled in the portal")
            groups = _groups(claims, payload)
            sync_roles(user, roles_from(groups), identity)
            identity.last_login_at, identity.last_groups = timezone.now(), groups[:50]
            identity.email_verified = _address_verified(user, claims)
            identity.save(update_fields=["last_login_at", "last_groups", "email_verified"])
        return user


def _identity(issuer, subject, claims):
    """The account linked to (issuer, subject); a new one at the first login."""
    identity = SsoIdentity.objects.select_related("user").filter(issuer=issuer, subject=subject).first()
    if identity is not None:
        return identity
    user = User(username=_free_username(claims, issuer), email=str(claims.get("email") or "")[:254])
    user.set_unusable_password()
    user.save()
    identity = SsoIdentity.objects.create(user=user, issuer=issuer, subject=subject)
    journal.record(
        "sso_user_created",
        actor=user.get_username(),
        obj=journal.Ref(user._meta.label, user.pk, user.get_username()),
        issuer=issuer,
        subject=subject,
    )
    return identity


def _address_verified(user, claims):
    """Did the provider vouch for the account's address at this login? Only its email_verified
    claim says so (absent, as from Entra ID, is not), and only for the address the account has:
    it is kept from the first login, never replaced by a later claim."""
    verified = claims.get("email_verified")
    # True, or the string "true" that some providers (AWS Cognito) send.
    verified = verified is True or (isinstance(verified, str) and verified.lower() == "true")
    mail = str(claims.get("email") or "").strip().lower()
    return verified and bool(mail) and mail == user.email.strip().lower()


def _free_username(claims, issuer):
    """The person's name at the provider, marked with it ("carol@idp.example.mv"): never a
    local account's name, so that the journal tells the two apart."""
    base = str(claims.get("preferred_username") or str(claims.get("email") or "").split("@")[0] or "user")
    base = re.sub(r"[^\w.+-]", "", base)[:60] or "user"
    host = re.sub(r"[^\w.-]", "-", re.sub(r"^\w+://", "", issuer).split("/")[0])[:60]
    name = f"{base}@{host}"
    for n in range(2, 1000):
        if not User.objects.filter(username__iexact=name).exists():
            return name
        name = f"{base}-{n}@{host}"
    raise Refused("no free user name for this person: ask an administrator")


def _groups(claims, payload):
    """The groups claim (userinfo first, then the ID token), as a list of names."""
    value = claims.get(settings.OIDC_GROUPS_CLAIM, payload.get(settings.OIDC_GROUPS_CLAIM, []))
    if isinstance(value, str):
        value = [value]
    return sorted({str(g)[:150] for g in value or [] if isinstance(g, str | int)})


def roles_from(groups):
    """The portal roles OIDC_ROLE_MAP gives these IdP groups."""
    return {settings.OIDC_ROLE_MAP[g] for g in groups if g in settings.OIDC_ROLE_MAP}


def sync_roles(user, roles, identity):
    """Exactly `roles` among the portal's three; groups of other names are left alone."""
    before = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
    if before != roles:
        user.groups.remove(*Group.objects.filter(name__in=before - roles))
        user.groups.add(*Group.objects.filter(name__in=roles - before))
        journal.record(
            "sso_roles_changed",
            actor=user.get_username(),
            obj=journal.Ref(user._meta.label, user.pk, user.get_username()),
            before=sorted(before),
            after=sorted(roles),
            issuer=identity.issuer,
        )
    # The catalogs (the admin) open to staff: an account with a role is staff, one without is not.
    if user.is_staff != bool(roles) and not user.is_superuser:
        user.is_staff = bool(roles)
        user.save(update_fields=["is_staff"])
    for cached in ("_role_names", "_role_perms"):
        user.__dict__.pop(cached, None)


def _refuse(request, reason):
    request.sso_refusal = reason
    journal.record("sso_login_refused", actor="sso", outcome="refused", reason=reason)
    log.warning("single sign-on refused: %s", reason)
    return None


@method_decorator(login_not_required, name="dispatch")
class LoginView(OIDCAuthenticationRequestView):
    """The SSO button's target: off (404) until OIDC_RP_CLIENT_ID is set."""

    def get(self, request):
        if not enabled():
            raise Http404("Single sign-on is not configured (OIDC_RP_CLIENT_ID).")
        return super().get(request)


@method_decorator(login_not_required, name="dispatch")
class CallbackView(OIDCAuthenticationCallbackView):
    """Where the provider sends the browser back; a failure goes to the login page with its reason."""

    def get(self, request):
        if not enabled():
            raise Http404("Single sign-on is not configured (OIDC_RP_CLIENT_ID).")
        if request.GET.get("error"):
            # Not the library's way (it logs out whoever is logged in): a link must not end a session.
            started = request.session.get("oidc_states", {}).pop(request.GET.get("state", ""), None)
            request.session.modified = True
            reason = f"the identity provider answered {request.GET['error'][:60]!r}"
            if started is None:  # no login this browser began: anyone can send the link, the journal is not theirs
                request.sso_refusal = reason
            else:
                _refuse(request, reason)
            return self.login_failure()
        return super().get(request)

    def login_failure(self):
        reason = getattr(self.request, "sso_refusal", "") or "the login was not completed: start again"
        messages.error(self.request, f"Single sign-on failed: {reason}.")
        return redirect("login")
