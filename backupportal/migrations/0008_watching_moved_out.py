"""Alerts, RPO and the maintenance calendar moved to the watching app (watching 0001).

State only: the tables stay where they are, under their names (each model keeps its db_table),
so not one row moves and the journal's table is not touched (on SQLite, altering it would drop
0007's append-only triggers). watching 0001 takes the same models over, on the same tables.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("backupportal", "0007_journal_sqlite_trigger"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveField(
                    model_name='maintenancetask',
                    name='completed_by',
                ),
                migrations.RemoveField(
                    model_name='maintenancetask',
                    name='evidence_drill',
                ),
                migrations.RemoveField(
                    model_name='maintenancetask',
                    name='evidence_entry',
                ),
                migrations.RemoveField(
                    model_name='maintenancetask',
                    name='evidence_restore_test',
                ),
                migrations.RemoveField(
                    model_name='rposample',
                    name='server',
                ),
                migrations.RemoveField(
                    model_name='rpostatus',
                    name='server',
                ),
                migrations.DeleteModel(
                    name='Alert',
                ),
                migrations.DeleteModel(
                    name='MaintenanceTask',
                ),
                migrations.DeleteModel(
                    name='RpoSample',
                ),
                migrations.DeleteModel(
                    name='RpoStatus',
                ),
            ],
            database_operations=[],
        ),
    ]
