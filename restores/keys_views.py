"""The key custody page: which keys exist, what still needs each, what proved each (nothing secret)."""

from django.shortcuts import render
from django.views.decorators.http import require_safe

from backupportal.roles import require_perm
from restores.keys import custody


@require_safe
@require_perm("backups.view_encryptionkey")
def key_custody(request):
    return render(request, "restores/key_custody.html", {"rows": custody()})
