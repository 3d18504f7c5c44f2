"""What the ground keeps: the operations journal and the login limits."""

import math

from django.conf import settings
from django.db import connection, models, transaction
from django.urls import reverse
from django.utils import timezone


class JournalEntry(models.Model):
    """One line of the operations journal. Append-only and HMAC-chained (see journal.py)."""

    class Outcome(models.TextChoices):
        OK = "ok", "OK"
        FAILED = "failed", "Failed"
        REFUSED = "refused", "Refused"
        INFO = "info", "Info"

    at = models.DateTimeField(default=timezone.now)
    actor = models.CharField(max_length=150, help_text="a user name, or job:<name>, or os:<user>")
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=64, blank=True, verbose_name="object id")
    object_repr = models.CharField(max_length=200, blank=True)
    server = models.CharField(max_length=63, blank=True)
    outcome = models.CharField(max_length=7, choices=Outcome.choices, default=Outcome.OK)
    details = models.JSONField(default=dict, blank=True)
    prev_hmac = models.CharField(max_length=64, verbose_name="previous entry's HMAC")
    hmac = models.CharField(max_length=64, verbose_name="HMAC")

    class Meta:
        verbose_name_plural = "journal entries"
        ordering = ["-id"]
        indexes = [
            # Used by the auditor's pages: each filter, newest first, paged by (at, id).
            models.Index(fields=["at", "id"], name="journal_at_id"),
            models.Index(fields=["actor", "at", "id"], name="journal_actor_at_id"),
            models.Index(fields=["action", "at", "id"], name="journal_action_at_id"),
            models.Index(fields=["server", "at", "id"], name="journal_server_at_id"),
            # Used by the history of one object on its page (an alert's).
            models.Index(fields=["object_type", "object_id"], name="journal_object"),
        ]

    def __str__(self):
        # In the portal's time zone, as every page shows times (the maintenance form lists entries by it).
        return f"{timezone.localtime(self.at):%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_repr}"

    def get_absolute_url(self):
        return reverse("journal-entry", args=[self.pk])

    def get_object_url(self):
        """Where the link to the entry's object goes; it is resolved when followed."""
        return reverse("journal-object", args=[self.pk]) if self.object_type else ""


# The first key of the login limits' advisory locks on PostgreSQL (the second is the address's hash).
LOGIN_LOCK_CLASS = 0x6C6F67  # "log"


class LoginFailure(models.Model):
    """A failed login, kept for LOGIN_FAILURE_WINDOW seconds: what the login limits count.

    Per user name and address, failures slow the next attempt from that address down (a growing
    wait, capped): a guesser waits between guesses, while the owner at another address is not
    slowed by them, so an outsider cannot keep the approvers out during an incident (a wait per
    user name alone could be kept running by polling it from elsewhere). Per address, too many
    failures refuse that address until the window passes: one password sprayed against many user
    names comes from one address (behind a proxy: see TRUSTED_PROXIES). A guesser with many
    addresses gets LOGIN_ADDRESS_LIMIT guesses per window from each: the second factor, not
    this count, is what keeps a guessed password from opening an approver's account.
    """

    username = models.CharField(max_length=150)
    address = models.CharField(max_length=45, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            # Used by the login limits on every attempt, and by the pruning of old rows.
            models.Index(fields=["username", "at"], name="loginfailure_username_at"),
            models.Index(fields=["address", "at"], name="loginfailure_address_at"),
            models.Index(fields=["at"], name="loginfailure_at"),
        ]

    def __str__(self):
        return f"{self.username} from {self.address or 'unknown'} at {self.at:%Y-%m-%d %H:%M:%S}"

    @staticmethod
    def key(username):
        return str(username or "").strip().lower()[:150]

    @classmethod
    def refusal(cls, username, address, now=None):
        """Why this attempt may not be checked now (one line), or ''."""
        now = now or timezone.now()
        recent = cls.objects.filter(at__gte=now - timezone.timedelta(seconds=settings.LOGIN_FAILURE_WINDOW))
        if address and recent.filter(address=address).count() >= settings.LOGIN_ADDRESS_LIMIT:
            minutes = -(-settings.LOGIN_FAILURE_WINDOW // 60)
            return f"Too many failed logins from your address ({address}): try again in {minutes} minutes."
        # No user name: single sign-on's callback, limited by address only (its failures carry
        # no name, and one person's would otherwise slow every other's down).
        name = cls.key(username)
        wait = cls.wait_for(recent.filter(username=name, address=address), now) if name else 0
        if wait > 0:
            return f"Too many failed logins for this user name from your address: wait {wait} seconds, then try again."
        return ""

    @staticmethod
    def wait_for(failures, now):
        """Seconds still to wait: none after the first few failures, then 1, 2, 4... up to the cap."""
        stats = failures.aggregate(n=models.Count("id"), last=models.Max("at"))
        over = stats["n"] - settings.LOGIN_FREE_ATTEMPTS
        if over <= 0:
            return 0
        delay = min(2 ** min(over - 1, 16), settings.LOGIN_MAX_DELAY)
        return max(0, math.ceil((stats["last"] + timezone.timedelta(seconds=delay) - now).total_seconds()))

    @classmethod
    def admit(cls, username, address):
        """(refusal, None) when the limits refuse this attempt; else ('', a failure already counted).

        Checking the limits and counting the attempt are one step, serialised per address: fifty
        attempts sent at once would otherwise all pass the check before the first was counted.
        The attempt is counted as failed before its password is checked; the caller deletes the
        row when the password was right.
        """
        with transaction.atomic():
            cls._serialise(address)
            refusal = cls.refusal(username, address)
            return refusal, (None if refusal else cls.record(username, address))

    @staticmethod
    def _serialise(address):
        # On SQLite the transaction already holds the write lock from BEGIN (settings.py's
        # transaction_mode IMMEDIATE). Per address, not per user name: the address limit counts
        # the attempts of every user name from it.
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s::integer, hashtext(%s))", [LOGIN_LOCK_CLASS, address])

    @classmethod
    def record(cls, username, address):
        now = timezone.now()
        cls.objects.filter(at__lt=now - timezone.timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)).delete()
        return cls.objects.create(username=cls.key(username), address=address[:45], at=now)

    @classmethod
    def forget(cls, username, address):
        """A successful login ends the wait its user name was under at that address, and only
        there: someone else's failures from other addresses keep counting against them."""
        cls.objects.filter(username=cls.key(username), address=address[:45]).delete()


class SsoIdentity(models.Model):
    """A portal account's identity at an OpenID Connect provider: (issuer, subject), and only that.

    The email an identity provider sends is not a key: anyone who can set an address there would
    become the local account that has it. A person who logs in through single sign-on gets an
    account of their own, linked here at the first login (backupportal/sso.py).
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sso_identities")
    issuer = models.CharField(max_length=255)
    subject = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)
    last_login_at = models.DateTimeField(null=True, blank=True)
    # The IdP groups of the last login, for the admin's page: the roles were computed from them.
    last_groups = models.JSONField(default=list, blank=True)
    # Whether, at the last login, the provider marked verified the e-mail address the account
    # has (the one of its first login): four eyes tells it from a local account only then
    # (backupportal.roles.same_person).
    email_verified = models.BooleanField(default=False)

    class Meta:
        verbose_name = "single sign-on identity"
        verbose_name_plural = "single sign-on identities"
        constraints = [models.UniqueConstraint(fields=["issuer", "subject"], name="sso_identity_issuer_subject")]

    def __str__(self):
        return f"{self.subject} at {self.issuer}"
