// Reloads the request page while its restore is queued or running, so progress shows without a manual reload.
(function () {
  async function tick() {
    const rows = document.querySelectorAll("tr.restore-run:not([data-done='1'])");
    if (!rows.length) { setTimeout(() => window.location.reload(), 1500); return; }
    for (const row of rows) {
      try {
        const p = await (await fetch(row.dataset.url)).json();
        row.querySelector(".run-status").textContent = p.status;
        row.querySelector(".run-bytes").textContent = (p.bytes_done / 1048576).toFixed(1) + " MB";
        if (p.done) { window.location.reload(); return; }
      } catch (e) { /* next tick */ }
    }
    setTimeout(tick, 1000);
  }
  setTimeout(tick, 1000);
})();
