"""Where a link to an object goes: its own page when it has one, else its admin change page."""

from django.contrib import admin
from django.urls import NoReverseMatch, reverse


def admin_url(model, pk):
    if model not in admin.site._registry:
        return ""
    try:
        return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[pk])
    except NoReverseMatch:
        return ""


def url_for(obj):
    """The page of a model instance, or '' when it has none."""
    if hasattr(obj, "get_absolute_url"):
        return obj.get_absolute_url()
    return admin_url(type(obj), obj.pk)
