from django.urls import path

from watching import evidence_views, maintenance_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("coverage/", views.coverage_view, name="coverage"),
    path("alerts/", views.alert_list, name="alerts"),
    path("alerts/<int:alert_id>/", views.alert_detail, name="alert"),
    path("alerts/<int:alert_id>/acknowledge/", views.acknowledge_alert, name="alert-acknowledge"),
    path("metrics", views.metrics, name="metrics"),
    path("servers/<str:name>/", views.server_detail, name="server"),
    path("servers/<str:name>/critical-tables/", views.critical_tables_edit, name="critical-tables-edit"),
    path("maintenance/", maintenance_views.calendar, name="maintenance"),
    path("maintenance/<int:task_id>/complete/", maintenance_views.complete, name="maintenance-complete"),
    path("evidence/", evidence_views.evidence_page, name="evidence"),
    path("evidence/make/", evidence_views.evidence_make, name="evidence-make"),
    path("evidence/<int:pack_id>/", evidence_views.evidence_detail, name="evidence-pack"),
    path("evidence/<int:pack_id>/zip/", evidence_views.evidence_download, {"part": "zip"}, name="evidence-zip"),
    path("evidence/<int:pack_id>/sig/", evidence_views.evidence_download, {"part": "signature"}, name="evidence-sig"),
]
