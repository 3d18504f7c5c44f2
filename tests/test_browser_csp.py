"""The Content-Security-Policy in a real browser: the portal's pages and the admin run with no
violation, the drill report's Print button works from its static script, and an injected
inline script is refused."""

import pytest

from tests.conftest import make_user
from tests.test_browser import browser, browser_cluster, log_in, portal, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Before any script of the page: count the violations the browser reports, and record a print.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
window.print = () => { window.__printed = true; };
"""


def test_pages_run_under_the_policy_and_inline_script_is_refused(portal, browser, server):  # noqa: F811
    from restores.models import DrDrill

    dora = make_user("dora", "DBA")
    drill = DrDrill.objects.create(title="Annual drill", logged_by=dora, server=server)
    page = log_in(browser, portal, "dora")
    page.add_init_script(WATCH)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    for path in [
        "/",
        f"/servers/{server.name}/",
        "/journal/",
        "/drills/new/",
        f"/drills/{drill.pk}/",
        "/admin/",
        f"/admin/restores/drdrill/{drill.pk}/change/",
    ]:
        page.goto(portal + path)
        page.wait_for_load_state("load")
        assert page.evaluate("window.__violations") == [], path
    page.goto(portal + f"/drills/{drill.pk}/report/")
    page.click("button[data-print]")
    assert page.evaluate("window.__printed") is True  # the static print.js ran
    assert errors == []

    # An inline script that made it into a page (say, by an injection) does not run.
    page.evaluate("""() => {
        const s = document.createElement("script");
        s.textContent = "window.__injected = true";
        document.body.appendChild(s);
    }""")
    page.wait_for_function("window.__violations.length > 0")
    assert page.evaluate("window.__injected") is None
    assert any(v.startswith("script-src") for v in page.evaluate("window.__violations"))
