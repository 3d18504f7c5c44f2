"""django-q2 tasks of the shared part of the portal: thin wrappers, named in schedules."""


def monitor_once():
    """The "monitor" schedule, every minute: see backupportal.monitor."""
    from backupportal import monitor

    result = monitor.run_once()
    return {k: v for k, v in result.items() if k != "checks"}
