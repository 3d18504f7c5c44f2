"""One way of writing a moment everywhere, pages and forms alike: 2026-12-03 14:30.

Django's en-GB formats wrote "3 Dec 2026, 2:30 p.m." where a template did not choose, beside
pages that wrote 2026-12-03 14:30; DBAs read logs in the ISO form, so that is the one.
The time zone is the portal's (TIME_ZONE), named in every page's footer.
"""

DATE_FORMAT = "Y-m-d"
DATETIME_FORMAT = "Y-m-d H:i"
SHORT_DATE_FORMAT = "Y-m-d"
SHORT_DATETIME_FORMAT = "Y-m-d H:i"
TIME_FORMAT = "H:i"
DATE_INPUT_FORMATS = ["%Y-%m-%d"]
DATETIME_INPUT_FORMATS = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"]
