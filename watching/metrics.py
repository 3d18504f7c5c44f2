"""/metrics: the catalog's figures in Prometheus text format, per server and storage location.

A custom collector reads the catalog at scrape time (the same few queries as the dashboard,
whatever the number of servers); nothing is kept in process memory, so every web worker
answers the same. Labels carry names only: never a DSN, a path or a secret.
"""

from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from backups.models import BackupCopy, Server, StorageLocation
from watching import dashboard
from watching.models import Alert


class CatalogCollector:
    def collect(self):
        now = timezone.now()
        servers = list(dashboard.servers())
        yield from self.backups(servers, now)
        yield from self.objectives(servers)
        yield from self.alerts(servers)
        yield from self.locations()

    def backups(self, servers, now):
        age = GaugeMetricFamily(
            "backupportal_backup_age_seconds",
            "Age of the newest good backup, by server and kind.",
            labels=["server", "kind"],
        )
        for server in servers:
            for run in server.newest_good_runs:
                age.add_metric([server.name, run.kind], (now - run.finished_at).total_seconds())
        yield age

    def objectives(self, servers):
        rpo = GaugeMetricFamily(
            "backupportal_rpo_seconds",
            "Achieved RPO: age of the oldest WAL written but not yet archived (servers archiving WAL).",
            labels=["server"],
        )
        rpo_objective = GaugeMetricFamily("backupportal_rpo_objective_seconds", "RPO objective.", labels=["server"])
        rto = GaugeMetricFamily(
            "backupportal_rto_seconds",
            "Measured RTO: the slowest restore test passed in the last five weeks (else the newest passed).",
            labels=["server"],
        )
        rto_objective = GaugeMetricFamily(
            "backupportal_rto_objective_seconds", "RTO objectives.", labels=["server", "scope"]
        )
        for server in servers:
            status = getattr(server, "rpo_status", None)
            if server.archiving != Server.Archiving.NONE and status is not None and status.seconds is not None:
                rpo.add_metric([server.name], status.seconds)
            rpo_objective.add_metric([server.name], server.rpo_minutes * 60)
            if server.last_rto_s is not None:
                rto.add_metric([server.name], server.last_rto_s)
            rto_objective.add_metric([server.name, "critical"], server.rto_critical_minutes * 60)
            rto_objective.add_metric([server.name, "full"], server.rto_full_minutes * 60)
        yield from (rpo, rpo_objective, rto, rto_objective)

    def alerts(self, servers):
        counts = (
            Alert.objects.exclude(state=Alert.State.RESOLVED)
            .values_list("condition", "server__name", "location__name")
            .annotate(n=Count("id"))
            .order_by()
        )
        by_condition, by_server, by_location = {}, {}, {}
        for condition, server, location, n in counts:
            by_condition[condition] = by_condition.get(condition, 0) + n
            if server:
                by_server[server, condition] = n
            if location:
                by_location[location, condition] = n
        total = GaugeMetricFamily("backupportal_alerts_open", "Open alerts, by condition.", labels=["condition"])
        per_server = GaugeMetricFamily(
            "backupportal_server_alerts_open", "Open alerts of a server, by condition.", labels=["server", "condition"]
        )
        for condition in Alert.Condition.values:
            total.add_metric([condition], by_condition.get(condition, 0))
            for server in servers:
                per_server.add_metric([server.name, condition], by_server.get((server.name, condition), 0))
        per_location = GaugeMetricFamily(
            "backupportal_location_alerts_open",
            "Open alerts of a storage location, by condition.",
            labels=["location", "condition"],
        )
        for (location, condition), n in sorted(by_location.items()):
            per_location.add_metric([location, condition], n)
        yield from (total, per_server, per_location)

    def locations(self):
        free = GaugeMetricFamily(
            "backupportal_location_free_bytes", "Free bytes of a filesystem location.", labels=["location", "kind"]
        )
        capacity = GaugeMetricFamily(
            "backupportal_location_capacity_bytes",
            "Capacity of a filesystem location (capacity_bytes, else its filesystem's size).",
            labels=["location", "kind"],
        )
        copies = GaugeMetricFamily(
            "backupportal_location_copies", "Copies in a location, by status.", labels=["location", "status"]
        )
        locations = list(StorageLocation.objects.filter(enabled=True))
        watched = [BackupCopy.Status.PENDING, BackupCopy.Status.FAILED, BackupCopy.Status.BAD]
        counted = dict(
            ((name, status), n)
            for name, status, n in BackupCopy.objects.filter(status__in=watched)
            .values_list("location__name", "status")
            .annotate(n=Count("id"))
            .order_by()
        )
        for location in locations:
            figure = location.health()
            if figure["total"]:
                free.add_metric([location.name, location.kind], figure["free"])
                capacity.add_metric([location.name, location.kind], figure["total"])
            for status in watched:
                copies.add_metric([location.name, status], counted.get((location.name, status), 0))
        yield from (free, capacity, copies)
