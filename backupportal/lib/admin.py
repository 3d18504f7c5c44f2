"""Admin pages for what is history or is written by the portal alone: read, never edited by hand."""

from django.contrib import admin


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable; never added, changed or deleted in the admin (superusers included)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class SealedFieldsAdmin(admin.ModelAdmin):
    """An admin whose model keeps a sealed secret (a *_sealed field). Django lets any URL filter a
    changelist on a local field (?password_sealed__startswith=a): one row or none per guess
    would read the sealed text out a character at a time, to whoever may view the list."""

    def lookup_allowed(self, lookup, value, request=None):
        if any(part.endswith("_sealed") for part in lookup.split("__")):
            return False
        return super().lookup_allowed(lookup, value, request)
