from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("restores", "0006_restore_test_kind"),
    ]

    operations = [
        migrations.AlterField(
            model_name="restorerun",
            name="status",
            field=models.CharField(
                choices=[
                    ("queued", "Queued"),
                    ("running", "Running"),
                    ("succeeded", "Succeeded"),
                    ("succeeded with warnings", "Succeeded with warnings"),
                    ("failed", "Failed"),
                ],
                default="queued",
                max_length=23,
            ),
        ),
        migrations.AddField(
            model_name="restorerun",
            name="warnings",
            field=models.JSONField(blank=True, default=list, help_text="what of the backup could not be applied"),
        ),
    ]
