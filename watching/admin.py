"""Admin pages of what the portal watches: alerts (read only), the maintenance calendar, the
alert channels (Sysadmins edit them; their secrets are write-only) and what each is owed."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.utils.html import format_html

from backupportal.lib.admin import ReadOnlyAdmin, SealedFieldsAdmin
from backupportal.lib.inputs import ModelMultipleChoiceField
from backupportal.lib.sealed import SealError
from watching import channels
from watching.models import Alert, AlertChannel, ChannelDelivery, EvidencePack, MaintenanceTask


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """Read only: the monitor alone opens and resolves alerts, and acknowledging needs a note,
    given on the alert's own page ("View on site")."""

    list_display = [
        "id",
        "condition",
        "subject",
        "state",
        "opened_at",
        "last_seen_at",
        "resolved_at",
        "opened_mail_sent_at",
    ]
    list_filter = ["state", "condition"]
    search_fields = ["subject", "message"]


@admin.register(MaintenanceTask)
class MaintenanceTaskAdmin(admin.ModelAdmin):
    # Tasks are completed on the calendar page (with their evidence); a superuser may move a due date here.
    list_display = ["kind", "due_on", "completed_at", "completed_by", "evidence"]
    list_filter = ["kind", ("completed_at", admin.EmptyFieldListFilter)]
    list_select_related = ["completed_by", "evidence_entry", "evidence_restore_test", "evidence_drill"]
    raw_id_fields = ["evidence_entry", "evidence_restore_test", "evidence_drill"]

    @admin.display(description="Evidence")
    def evidence(self, obj):
        link = obj.evidence_link()
        return format_html('<a href="{}">{}</a>', *link) if link else "-"

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return False


class AlertChannelForm(forms.ModelForm):
    # Write-only: the stored secret is never rendered back into the page.
    new_secret = forms.CharField(
        label="Secret",
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Slack, Discord: the webhook URL; Teams: the workflow URL; Telegram: the bot token; "
        "JSON webhook: the URL. Leave empty to keep the current one.",
    )
    conditions = forms.MultipleChoiceField(
        choices=Alert.Condition.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every condition.",
    )

    class Meta:
        model = AlertChannel
        fields = ["name", "kind", "enabled", "target", "conditions", "servers"]
        field_classes = {"servers": ModelMultipleChoiceField}  # a server id too big for an integer: a form error

    def clean(self):
        cleaned = super().clean()
        kind, target = cleaned.get("kind"), cleaned.get("target", "")
        if not kind:
            return cleaned
        secret = cleaned.get("new_secret", "").strip()
        if not secret:
            secret = self._stored_secret(kind)
        try:
            self.instance.secret_hint = channels.check_settings(kind, target, secret)
        except ValidationError as e:
            raise ValidationError(e.messages[0]) from None
        self._secret = secret
        return cleaned

    def _stored_secret(self, kind):
        if not self.instance.secret_sealed:
            raise ValidationError(f"Give the secret: {channels.SECRET_HELP[kind]}.")
        if self.instance.pk and kind != AlertChannel.objects.get(pk=self.instance.pk).kind:
            raise ValidationError("The kind changed: give the secret for the new kind.")
        try:
            return self.instance.secret
        except SealError as e:
            raise ValidationError(str(e)) from None

    def save(self, commit=True):
        self.instance.secret = self._secret
        return super().save(commit)


@admin.register(AlertChannel)
class AlertChannelAdmin(SealedFieldsAdmin):
    form = AlertChannelForm
    list_display = ["name", "kind", "enabled", "secret_hint", "status", "last_sent_at", "last_failed_at", "error"]
    list_filter = ["kind", "enabled"]
    readonly_fields = ["secret_hint", "status", "last_sent_at", "last_failed_at", "failures", "last_error"]
    filter_horizontal = ["servers"]
    actions = ["send_test"]

    @admin.action(description="Send a test message", permissions=["change"])
    def send_test(self, request, queryset):
        for channel in queryset:
            error = channels.send_test(channel, actor=request.user.get_username())
            if error:
                self.message_user(request, f"{channel.name}: the test message failed: {error}", messages.ERROR)
            else:
                self.message_user(request, f"{channel.name}: the test message was sent.", messages.SUCCESS)

    @admin.display(description="Last error")
    def error(self, obj):
        return obj.last_error[:120] if obj.failures else ""


@admin.register(ChannelDelivery)
class ChannelDeliveryAdmin(ReadOnlyAdmin):
    """Written by the monitor alone: what each alert owes each channel, and how sending went."""

    list_display = ["alert", "channel", "event", "sent_at", "attempts", "next_attempt_at", "last_error"]
    list_filter = ["event", "channel"]
    list_select_related = ["alert__server", "alert__location", "channel"]


@admin.register(EvidencePack)
class EvidencePackAdmin(ReadOnlyAdmin):
    list_display = ["id", "period_start", "period_end", "made_by", "made_at", "sha256"]
    list_select_related = ["made_by"]
