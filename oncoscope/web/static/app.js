// oncoscope front-end: progressive enhancement only; every page works without it.
(function () {
  "use strict";

  // A form sent back with errors: take the reader (and screen reader) to the list of problems.
  var summary = document.querySelector(".error-summary");
  if (summary) { summary.focus(); summary.scrollIntoView({ block: "start" }); }

  // Drag and drop onto a dropzone fills the linked file input.
  document.querySelectorAll(".dropzone").forEach(function (zone) {
    var input = document.getElementById(zone.dataset.for);
    if (!input) return;
    zone.tabIndex = 0;
    zone.setAttribute("role", "button");
    zone.addEventListener("click", function () { input.click(); });
    zone.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    ["dragenter", "dragover"].forEach(function (ev) {
      zone.addEventListener(ev, function (e) { e.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (ev) {
      zone.addEventListener(ev, function (e) { e.preventDefault(); zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (e) {
      if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
    });
    input.addEventListener("change", show);
    function show() {
      var n = input.files.length;
      zone.textContent = n ? n + " file" + (n > 1 ? "s" : "") + " selected: " +
        Array.prototype.map.call(input.files, function (f) { return f.name; }).join(", ") : "Drop images here or choose files";
    }
  });

  // Uploads to an existing case go through XHR to show progress.
  document.querySelectorAll("form.upload[data-async]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      var input = form.querySelector("input[type=file]");
      if (!input.files.length) return;
      e.preventDefault();
      var bar = form.querySelector("progress"), msg = form.querySelector(".upload-msg");
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("Accept", "application/json");
      bar.hidden = false;
      xhr.upload.onprogress = function (ev) { if (ev.lengthComputable) bar.value = Math.round(100 * ev.loaded / ev.total); };
      xhr.onload = function () {
        var data = {};
        try { data = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
        if (xhr.status >= 200 && xhr.status < 300) { window.location.reload(); return; }
        msg.textContent = data.error || (data.errors || []).map(function (x) { return x.file + ": " + x.message; }).join(" ") ||
          "The upload failed (" + xhr.status + ").";
        msg.className = "upload-msg error";
      };
      xhr.onerror = function () { msg.textContent = "The upload failed: no connection to the server."; msg.className = "upload-msg error"; };
      xhr.send(new FormData(form));
    });
  });

  // While a case is being analysed, poll its status and reload when it changes.
  var st = document.getElementById("case-status");
  if (st && st.dataset.caseStatus === "analysing") {
    var poll = function () {
      fetch(st.dataset.statusUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (d) { if (d && d.status !== "analysing") window.location.reload(); else setTimeout(poll, 1000); })
        .catch(function () { setTimeout(poll, 3000); });
    };
    setTimeout(poll, 700);
  }

  // Heatmap opacity sliders.
  document.querySelectorAll("figure.heat").forEach(function (fig) {
    var layer = fig.querySelector("img.layer"), range = fig.querySelector("input.opacity");
    if (!layer || !range) return;
    var apply = function () { layer.style.opacity = range.value / 100; };
    range.addEventListener("input", apply);
    apply();
  });
})();

// Forms that do something final ask first (data-confirm holds the question; the CSP forbids inline handlers).
document.addEventListener("submit", function (e) {
  var form = e.target;
  if (form && form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) e.preventDefault();
}, true);
