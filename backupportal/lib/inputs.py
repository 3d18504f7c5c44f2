"""Input checks that turn a typed value the database or Python cannot hold into a form error.

A date in the year 1 is a valid Python date, but shifted to UTC it falls out of range and the
save crashes (a 500); a primary key of 23 digits does not fit SQLite's or PostgreSQL's integers.
A person gets a form error naming the field's problem instead.
"""

import datetime

from django import forms
from django.core.exceptions import ValidationError

# Every date the portal records (drills, steps, points in time, journal filters) lies well
# inside these years; outside them a date is a typo, and near year 1 or 9999 it cannot be saved.
FIRST_YEAR, LAST_YEAR = 1900, 2999
BIGINT = 2**63


def validate_moment(value):
    """A date or date and time between FIRST_YEAR and LAST_YEAR."""
    if isinstance(value, datetime.date) and not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise ValidationError(
            f"The year {value.year} is out of range: enter a date between {FIRST_YEAR} and {LAST_YEAR}.",
            code="out_of_range",
        )


class ModelMultipleChoiceField(forms.ModelMultipleChoiceField):
    """Django's, refusing a key too big for a database integer before it reaches the query
    (SQLite raises OverflowError on it instead of finding nothing)."""

    def _check_values(self, value):
        for pk in value if isinstance(value, list | tuple) else []:
            text = str(pk).strip()
            if text.lstrip("-").isdigit() and not -BIGINT <= int(text) < BIGINT:
                raise ValidationError(
                    self.error_messages["invalid_pk_value"], code="invalid_pk_value", params={"pk": text[:30]}
                )
        return super()._check_values(value)


class SaneInputsMixin:
    """For a form class: every date and date-and-time field refuses years out of range."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            if isinstance(field, forms.DateField | forms.DateTimeField | forms.SplitDateTimeField):
                field.validators.append(validate_moment)
