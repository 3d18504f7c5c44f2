from django.urls import path

from restores import drill_views, keys_views, views

urlpatterns = [
    path("restores/", views.restore_requests, name="restore-requests"),
    path("restores/new/", views.restore_request_new, name="restore-request-new"),
    path("restores/<int:pk>/", views.restore_request_detail, name="restore-request"),
    path("restores/<int:pk>/approve/", views.restore_request_approve, name="restore-request-approve"),
    path("restores/<int:pk>/reject/", views.restore_request_reject, name="restore-request-reject"),
    path("restores/runs/<int:pk>/progress.json", views.restore_progress, name="restore-progress"),
    path("restores/runs/<int:pk>/sandbox/remove/", views.sandbox_remove, name="sandbox-remove"),
    path("servers/<str:name>/restoretest/", views.restore_test_now, name="restore-test-now"),
    path("restoretests/<int:pk>/", views.restore_test_detail, name="restore-test"),
    path("restoretests/<int:pk>/progress.json", views.restore_test_progress, name="restore-test-progress"),
    path("keys/", keys_views.key_custody, name="key-custody"),
    path("drills/", drill_views.drill_list, name="drills"),
    path("drills/new/", drill_views.drill_new, name="drill-new"),
    path("drills/<int:drill_id>/", drill_views.drill_detail, name="drill"),
    path("drills/<int:drill_id>/edit/", drill_views.drill_edit, name="drill-edit"),
    path("drills/<int:drill_id>/steps/<slug:step>/", drill_views.drill_step, name="drill-step"),
    path("drills/<int:drill_id>/report/", drill_views.drill_report, name="drill-report"),
]
