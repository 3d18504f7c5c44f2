"""The watching app takes over alerts, RPO and the maintenance calendar, on their old tables."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('backupportal', '0008_watching_moved_out'),
        ('backups', '0007_pg_bin_from_pg_bin_dirs'),
        ('restores', '0007_restore_warnings'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    # State only: the tables are backupportal's, made by its migrations 0001-0005 and kept
    # with every row (each model names its old db_table); backupportal 0008 let go of them.
    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='RpoStatus',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('measured_at', models.DateTimeField(default=django.utils.timezone.now)),
                        ('seconds', models.FloatField(blank=True, help_text='empty: could not be measured (see error)', null=True)),
                        ('error', models.TextField(blank=True)),
                        ('current_wal', models.CharField(blank=True, help_text='the WAL file being written', max_length=40)),
                        ('archived_wal', models.CharField(blank=True, help_text='the newest WAL file archived', max_length=40)),
                        ('pending_lsn', models.BigIntegerField(blank=True, null=True)),
                        ('pending_since', models.DateTimeField(blank=True, null=True)),
                        ('server', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='rpo_status', to='backups.server')),
                    ],
                    options={
                        'verbose_name': 'RPO status',
                        'verbose_name_plural': 'RPO statuses',
                        'db_table': 'backupportal_rpostatus',
                    },
                ),
                migrations.CreateModel(
                    name='Alert',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('condition', models.CharField(choices=[('backup_missing', 'Daily backup missing'), ('backup_failed', 'Backup job failure or timeout'), ('corruption', 'Backup corruption detected'), ('storage_low', 'Insufficient storage space'), ('upload_failed', 'Cloud upload failure'), ('restore_test_failed', 'Restore test failure'), ('rpo_breached', 'RPO breached'), ('wal_gap', 'WAL gap'), ('archive_failing', 'WAL archiving failing'), ('receiver_down', 'Replication slot or pg_receivewal down'), ('maintenance_overdue', 'Maintenance task overdue')], max_length=24)),
                        ('subject', models.CharField(max_length=100)),
                        ('state', models.CharField(choices=[('open', 'Open'), ('acknowledged', 'Acknowledged'), ('resolved', 'Resolved')], default='open', max_length=12)),
                        ('message', models.TextField()),
                        ('opened_at', models.DateTimeField(default=django.utils.timezone.now)),
                        ('last_seen_at', models.DateTimeField(default=django.utils.timezone.now)),
                        ('resolved_at', models.DateTimeField(blank=True, null=True)),
                        ('acknowledged_at', models.DateTimeField(blank=True, null=True)),
                        ('ack_note', models.TextField(blank=True)),
                        ('opened_mail_sent_at', models.DateTimeField(blank=True, null=True)),
                        ('resolved_mail_sent_at', models.DateTimeField(blank=True, null=True)),
                        ('mail_attempts', models.PositiveIntegerField(default=0)),
                        ('mail_error', models.TextField(blank=True)),
                        ('acknowledged_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to=settings.AUTH_USER_MODEL)),
                        ('location', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='alerts', to='backups.storagelocation')),
                        ('server', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='alerts', to='backups.server')),
                    ],
                    options={
                        'db_table': 'backupportal_alert',
                        'ordering': ['-opened_at'],
                        'permissions': [('acknowledge_alert', 'Can acknowledge an alert')],
                        'indexes': [models.Index(fields=['state', '-opened_at'], name='alert_state'), models.Index(condition=models.Q(('opened_mail_sent_at', None), models.Q(('resolved_mail_sent_at', None), ('state', 'resolved')), _connector='OR'), fields=['id'], name='alert_mail_pending')],
                        'constraints': [models.UniqueConstraint(condition=models.Q(('state', 'resolved'), _negated=True), fields=('condition', 'subject'), name='one_open_alert_per_condition_subject')],
                    },
                ),
                migrations.CreateModel(
                    name='MaintenanceTask',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('kind', models.CharField(choices=[('weekly_verify', 'Weekly: verify backup completion and integrity'), ('monthly_restore_test', 'Monthly: test restore procedures'), ('quarterly_retention_review', 'Quarterly: review retention policies'), ('annual_dr_drill', 'Annually: DR drill and documentation update'), ('strategy_review', 'Review of the backup strategy document')], max_length=32)),
                        ('due_on', models.DateField(help_text='done by the end of this day (TIME_ZONE), or it is overdue')),
                        ('completed_at', models.DateTimeField(blank=True, null=True)),
                        ('evidence_url', models.CharField(blank=True, help_text='a link to a document or ticket (https://...) or a portal page (/...)', max_length=500)),
                        ('notes', models.TextField(blank=True)),
                        ('completed_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to=settings.AUTH_USER_MODEL)),
                        ('evidence_drill', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='restores.drdrill')),
                        ('evidence_entry', models.ForeignKey(blank=True, help_text='a journal entry, e.g. of a verify run', null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='backupportal.journalentry')),
                        ('evidence_restore_test', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='restores.restoretest')),
                    ],
                    options={
                        'db_table': 'backupportal_maintenancetask',
                        'ordering': ['due_on', 'id'],
                        'permissions': [('complete_maintenance', 'Can complete a maintenance task')],
                        'indexes': [models.Index(condition=models.Q(('completed_at', None)), fields=['due_on'], name='task_open_due')],
                        'constraints': [models.UniqueConstraint(condition=models.Q(('completed_at', None)), fields=('kind',), name='one_open_task_per_kind')],
                    },
                ),
                migrations.CreateModel(
                    name='RpoSample',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('hour', models.DateTimeField()),
                        ('worst_seconds', models.FloatField()),
                        ('server', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='rpo_samples', to='backups.server')),
                    ],
                    options={
                        'db_table': 'backupportal_rposample',
                        'constraints': [models.UniqueConstraint(fields=('server', 'hour'), name='one_rpo_sample_per_hour')],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
