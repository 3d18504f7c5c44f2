"""An admin form posted as a browser posts it: every field with what the page shows, then changes."""

from django import forms


def admin_form_data(client, url, **changes):
    """GET `url` (an admin add or change page) and return its form's data, with `changes` applied."""
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    form = response.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
            continue
        value = "" if value is None else value  # value() is already as the page renders it
        data[name] = value
        if field.show_hidden_initial:  # a callable default: the page carries its initial value too
            data[f"initial-{name}"] = value
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data
