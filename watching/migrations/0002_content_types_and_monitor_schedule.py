"""What named the moved models by their old app follows them to watching.

- Content types: renamed in place (backupportal -> watching), so the permissions granted on
  them (acknowledge an alert, complete a maintenance task) and the admin's history keep theirs.
- django-q2's Schedule rows name their function by dotted path: the monitor's moved from
  backupportal.tasks to watching.tasks, and a row left on the old path would fail every minute.
"""

from django.db import migrations

MODELS = ["alert", "rpostatus", "rposample", "maintenancetask"]
MONITOR = {"backupportal.tasks.monitor_once": "watching.tasks.monitor_once"}


def rename_content_types(apps, old, new):
    ContentType = apps.get_model("contenttypes", "ContentType")
    for model in MODELS:
        # A content type already made under the new name (a migrate that stopped half-way) is
        # left as it is: the roles' groups are given its permissions after every migrate.
        if not ContentType.objects.filter(app_label=new, model=model).exists():
            ContentType.objects.filter(app_label=old, model=model).update(app_label=new)


def rename_functions(apps, renames):
    Schedule = apps.get_model("django_q", "Schedule")
    for old, new in renames.items():
        Schedule.objects.filter(func=old).update(func=new)


def forwards(apps, schema_editor):
    rename_content_types(apps, "backupportal", "watching")
    rename_functions(apps, MONITOR)


def backwards(apps, schema_editor):
    rename_content_types(apps, "watching", "backupportal")
    rename_functions(apps, {new: old for old, new in MONITOR.items()})


class Migration(migrations.Migration):
    dependencies = [
        ("watching", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("django_q", "0001_initial"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
