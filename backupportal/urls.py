from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from backupportal import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("backups.urls")),
    path("", include("restores.urls")),
    path("admin/", admin.site.urls),
]
