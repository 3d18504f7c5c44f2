from django.shortcuts import render

from backups.models import Server


def dashboard(request):
    servers = Server.objects.all()
    return render(request, "dashboard.html", {"servers": [s.health() for s in servers]})
