// Polls a run's progress while it is active, so the page never needs a manual reload.
(function () {
  const box = document.getElementById("progress");
  if (!box || box.dataset.done) return;
  const human = (n) => {
    if (n === null || n === undefined) return "";
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  };
  async function tick() {
    try {
      const r = await fetch(box.dataset.url, { headers: { Accept: "application/json" } });
      if (r.ok) {
        const p = await r.json();
        const status = document.getElementById("run-status");
        status.textContent = p.status;
        status.className = "status status-" + p.status;
        document.getElementById("run-bytes").textContent = human(p.bytes_done);
        document.getElementById("run-elapsed").textContent = p.elapsed_s.toFixed(1) + " s";
        document.getElementById("run-error").textContent = p.error || "";
        if (p.done) { window.location.reload(); return; }
      }
    } catch (e) { /* the next tick tries again */ }
    setTimeout(tick, 1000);
  }
  setTimeout(tick, 1000);
})();
