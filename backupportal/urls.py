from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from backupportal import journal_views, logins

urlpatterns = [
    path("login/", logins.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
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
