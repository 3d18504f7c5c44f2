from django.urls import path

from restores import views

urlpatterns = [
    path("drills/", views.drill_list, name="drills"),
    path("drills/new/", views.drill_new, name="drill-new"),
    path("drills/<int:drill_id>/", views.drill_detail, name="drill"),
    path("drills/<int:drill_id>/edit/", views.drill_edit, name="drill-edit"),
    path("drills/<int:drill_id>/steps/<slug:step>/", views.drill_step, name="drill-step"),
    path("drills/<int:drill_id>/report/", views.drill_report, name="drill-report"),
]
