"""Make (or update) the portal's client and the people of the test IdP, from JSON on stdin:
{"client_id", "client_secret", "redirect_uri", "users": [{"username", "password", "email",
"email_verified" (true, false, or absent: no such claim), "groups": [...]}]}. On stdin, so that
no secret is in argv."""

import json
import sys

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand
from oauth2_provider.models import Application

from tests.oidc_provider.validator import VERIFIED


class Command(BaseCommand):
    help = "seed the test identity provider from JSON on stdin"

    def handle(self, *args, **options):
        data = json.load(sys.stdin)
        if "client_id" in data:
            Application.objects.update_or_create(
                client_id=data["client_id"],
                defaults={
                    "name": "backupportal",
                    "client_secret": data["client_secret"],
                    "client_type": Application.CLIENT_CONFIDENTIAL,
                    "authorization_grant_type": Application.GRANT_AUTHORIZATION_CODE,
                    "redirect_uris": data["redirect_uri"],
                    "algorithm": Application.RS256_ALGORITHM,
                    "skip_authorization": False,
                },
            )
        for person in data.get("users", []):
            user, _ = User.objects.get_or_create(username=person["username"])
            user.email = person.get("email", "")
            user.set_password(person["password"])
            user.save()
            groups = list(person.get("groups", []))
            if "email_verified" in person:  # a marker the validator turns into the claim
                groups.append(f"{VERIFIED}{str(bool(person['email_verified'])).lower()}")
            user.groups.set([Group.objects.get_or_create(name=g)[0] for g in groups])
        self.stdout.write("seeded")
