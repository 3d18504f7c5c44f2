from django.urls import path

from backups import hold_views, views

# The server page itself (health, charts, critical tables) is watching's: it shows alerts.

urlpatterns = [
    path("servers/<str:name>/backup/", views.backup_now, name="backup-now"),
    path("servers/<str:name>/schedule/", views.schedule_edit, name="schedule-edit"),
    path("servers/<str:name>/retention/", views.server_retention, name="server-retention"),
    path("runs/<int:run_id>/", views.run_detail, name="run"),
    path("runs/<int:run_id>/progress.json", views.run_progress, name="run-progress"),
    path("runs/<int:run_id>/verify/", views.verify_run, name="verify-run"),
    path("runs/<int:run_id>/hold/", hold_views.hold_run, name="run-hold"),
    path("runs/<int:run_id>/release/", hold_views.request_release, name="run-release"),
    path("changes/", hold_views.change_requests, name="changes"),
    path("changes/<int:pk>/approve/", hold_views.change_approve, name="change-approve"),
    path("changes/<int:pk>/reject/", hold_views.change_reject, name="change-reject"),
    path("verifications/<int:pk>/", views.verification_detail, name="verification"),
    path("verifications/<int:pk>/progress.json", views.verification_progress, name="verification-progress"),
]
