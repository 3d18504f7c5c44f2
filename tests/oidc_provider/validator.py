"""The provider's claims: email, email_verified, preferred_username and the user's groups (Django
groups here), as an IdP such as Keycloak or Entra ID sends them, in the ID token and from userinfo.

Whether the address is verified is kept as a marker group (seedidp's VERIFIED), never sent as a
group: a person seeded without "email_verified" gets no such claim, as from Entra ID."""

from oauth2_provider.oauth2_validators import OAuth2Validator

VERIFIED = "idp:email_verified="


class GroupsValidator(OAuth2Validator):
    oidc_claim_scope = {**OAuth2Validator.oidc_claim_scope, "groups": "openid"}

    def get_additional_claims(self, request):
        user = request.user
        names = sorted(user.groups.values_list("name", flat=True))
        claims = {
            "email": user.email,
            "preferred_username": user.username,
            "groups": [name for name in names if not name.startswith(VERIFIED)],
        }
        for name in names:
            if name.startswith(VERIFIED):
                claims["email_verified"] = name == f"{VERIFIED}true"
        return claims
