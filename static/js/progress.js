// Polls a page's progress JSON (a backup run's, a verification's) while it is active, so the
// page never needs a manual reload. Inside #progress, an element with data-field="name" shows
// the JSON's value of that name, formatted by data-format (bytes, seconds, status; else text).
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
  const formats = {
    bytes: human,
    seconds: (s) => s.toFixed(1) + " s",
    text: (v) => (v === null || v === undefined ? "" : String(v)),
  };
  function show(p) {
    for (const el of box.querySelectorAll("[data-field]")) {
      const value = p[el.dataset.field];
      const format = el.dataset.format || "text";
      el.textContent = (formats[format] || formats.text)(value);
      if (format === "status") el.className = "status status-" + value;
    }
  }
  async function tick() {
    try {
      const r = await fetch(box.dataset.url, { headers: { Accept: "application/json" } });
      if (r.ok) {
        const p = await r.json();
        show(p);
        // Done: reload once for what only the full page shows (copies, results, messages).
        if (p.done) { window.location.reload(); return; }
      }
    } catch (e) { /* the next tick tries again */ }
    setTimeout(tick, 1000);
  }
  setTimeout(tick, 1000);
})();
