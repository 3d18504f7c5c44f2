"""A paginator for the admin's lists of history that grows by the million (WAL, copies, journal)."""

from django.core.paginator import Paginator
from django.utils.functional import cached_property


class CappedPaginator(Paginator):
    """Counts no further than CAP rows. Over a million rows an exact COUNT(*) reads the whole
    table for a number nobody needs; past the cap the list says "10000+" and a filter narrows
    it. The count is of a LIMITed subquery, walking the page's own index."""

    CAP = 10_000
    capped = False

    @cached_property
    def count(self):
        n = self.object_list[: self.CAP + 1].count()
        self.capped = n > self.CAP
        return min(n, self.CAP)
