from django.urls import path

from restores import views

urlpatterns = [
    path("restores/", views.restore_requests, name="restore-requests"),
    path("restores/new/", views.restore_request_new, name="restore-request-new"),
    path("restores/<int:pk>/", views.restore_request_detail, name="restore-request"),
    path("restores/<int:pk>/approve/", views.restore_request_approve, name="restore-request-approve"),
    path("restores/<int:pk>/reject/", views.restore_request_reject, name="restore-request-reject"),
    path("restores/runs/<int:pk>/progress.json", views.restore_progress, name="restore-progress"),
]
