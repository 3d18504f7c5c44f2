// The drill report's Print button: a static file, as the Content-Security-Policy allows no inline script.
document.addEventListener("DOMContentLoaded", function () {
  for (const button of document.querySelectorAll("[data-print]")) {
    button.addEventListener("click", function () { window.print(); });
  }
});
