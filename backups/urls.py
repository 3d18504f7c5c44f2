from django.urls import path

from backups import views

# The server page itself (health, charts, critical tables) is watching's: it shows alerts.

urlpatterns = [
    path("servers/<str:name>/backup/", views.backup_now, name="backup-now"),
    path("servers/<str:name>/schedule/", views.schedule_edit, name="schedule-edit"),
    path("runs/<int:run_id>/", views.run_detail, name="run"),
    path("runs/<int:run_id>/progress.json", views.run_progress, name="run-progress"),
    path("runs/<int:run_id>/verify/", views.verify_run, name="verify-run"),
    path("verifications/<int:pk>/", views.verification_detail, name="verification"),
    path("verifications/<int:pk>/progress.json", views.verification_progress, name="verification-progress"),
]
