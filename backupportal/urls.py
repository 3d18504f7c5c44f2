from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from backupportal import journal_views, logins, sso, twofactor_views

urlpatterns = [
    path("login/", logins.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("login/sso/", sso.LoginView.as_view(), name="oidc-login"),
    path("login/sso/callback/", sso.CallbackView.as_view(), name="oidc-callback"),
    path("account/two-factor/", twofactor_views.account, name="two-factor"),
    path("account/two-factor/start/", twofactor_views.start, name="two-factor-start"),
    path("account/two-factor/enrol/", twofactor_views.enrol, name="two-factor-enrol"),
    path("account/two-factor/confirm/", twofactor_views.confirm, name="two-factor-confirm"),
    path("account/two-factor/recovery-codes/", twofactor_views.recovery, name="two-factor-recovery"),
    path("account/two-factor/codes/", twofactor_views.codes, name="two-factor-codes"),
    path("account/two-factor/verify/", twofactor_views.verify, name="two-factor-verify"),
    path("journal/", journal_views.journal_list, name="journal"),
    path("journal/export.csv", journal_views.journal_export, name="journal-export"),
    path("journal/verify/", journal_views.journal_verify, name="journal-verify"),
    path("journal/<int:entry_id>/", journal_views.journal_entry, name="journal-entry"),
    path("journal/<int:entry_id>/object/", journal_views.journal_object, name="journal-object"),
    path("", include("watching.urls")),
    path("", include("backups.urls")),
    path("", include("restores.urls")),
    path("admin/", admin.site.urls),
]
