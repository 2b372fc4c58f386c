// Cell gallery: select cells with mouse or keyboard, verify or reclassify them with one key.
// The server is the record: every change is a POST; the page shows what it answers.
(function () {
  "use strict";
  var gal = document.getElementById("gallery");
  if (!gal) return;
  var cells = Array.prototype.slice.call(gal.querySelectorAll(".cell"));
  var KEYS = JSON.parse(gal.dataset.keys);
  var status = document.getElementById("gal-status");
  var info = document.getElementById("sel-info");
  var focus = 0, anchor = 0, busy = false;

  var IMAGES = JSON.parse(gal.dataset.images);  // image id -> {sprite, field} addresses
  window.OncoscopeThumbs.lazy(gal);

  cells.forEach(function (el, i) {
    el.addEventListener("click", function (e) {
      if (e.shiftKey) selectRange(anchor, i);
      else if (e.ctrlKey || e.metaKey) { toggle(el, !selected(el)); anchor = i; }
      else { clear(); toggle(el, true); anchor = i; }
      setFocus(i, false);
      gal.focus();
    });
  });

  function selected(el) { return el.getAttribute("aria-selected") === "true"; }
  function toggle(el, on) { el.setAttribute("aria-selected", on ? "true" : "false"); }
  function clear() { cells.forEach(function (el) { toggle(el, false); }); }
  function selection() { return cells.filter(selected); }
  function selectRange(a, b) {
    clear();
    for (var k = Math.min(a, b); k <= Math.max(a, b); k++) toggle(cells[k], true);
  }
  function setFocus(i, select) {
    if (!cells.length) return;
    focus = Math.max(0, Math.min(cells.length - 1, i));
    cells.forEach(function (el) { el.classList.remove("focus"); });
    var el = cells[focus];
    el.classList.add("focus");
    gal.setAttribute("aria-activedescendant", el.id);
    if (select) { clear(); toggle(el, true); anchor = focus; }
    el.scrollIntoView({ block: "nearest" });
    showField(el);
    showCount();
  }
  var ask = document.getElementById("cell-consult");  // "ask a colleague about the selected cells"
  function showCount() {
    var n = selection().length;
    info.textContent = n ? "(" + n + " selected)" : "";
    if (ask) ask.querySelector(".ask-count").textContent = n ? n + " cell" + (n > 1 ? "s" : "") + " selected."
      : "Select the cells to ask about in the gallery.";
  }
  if (ask) ask.addEventListener("submit", function (e) {
    var ids = selection().map(function (el) { return el.dataset.id; });
    if (!ids.length || ids.length > 200) {
      e.preventDefault();
      ask.querySelector(".ask-count").textContent = ids.length ? "Ask about at most 200 cells at a time."
        : "Select the cells to ask about in the gallery first.";
      return;
    }
    ask.elements["cell_ids"].value = ids.join(",");
  });
  function perRow() {
    var top = cells[focus].offsetTop, n = 0;
    for (var k = focus; k < cells.length && cells[k].offsetTop === top; k++) n++;
    for (k = focus - 1; k >= 0 && cells[k].offsetTop === top; k--) n++;
    return Math.max(1, n);
  }
  function nextUnverified(from) {
    for (var k = from + 1; k < cells.length; k++) if (!cells[k].classList.contains("verified")) return k;
    return Math.min(from + 1, cells.length - 1);
  }

  function showField(el) {
    var view = document.getElementById("field-view");
    if (!el.dataset.bbox) return;
    var b = el.dataset.bbox.split(",").map(Number);
    var img = view.querySelector("img"), field = IMAGES[el.dataset.image].field;
    if (!img || img.dataset.src !== field) {
      view.innerHTML = "";
      var wrap = document.createElement("div");
      wrap.className = "field-wrap";
      img = document.createElement("img");
      img.alt = "The image this cell is on, the cell outlined";
      img.dataset.src = field;
      img.src = field;
      var box = document.createElement("div");
      box.className = "field-box";
      wrap.appendChild(img); wrap.appendChild(box); view.appendChild(wrap);
    }
    function place() {
      var s = img.clientWidth / img.naturalWidth, box = view.querySelector(".field-box");
      box.style.left = (b[0] * s - 3) + "px"; box.style.top = (b[1] * s - 3) + "px";
      box.style.width = ((b[2] - b[0]) * s + 6) + "px"; box.style.height = ((b[3] - b[1]) * s + 6) + "px";
    }
    if (img.complete && img.naturalWidth) place(); else img.onload = place;
  }

  // Keys pressed while a change is being saved wait their turn (in order), so fast typing loses nothing;
  // a refused or failed change drops what was waiting behind it, and says so.
  var queue = [];
  function run(action) {
    if (busy) { queue.push(action); status.textContent = "Saving… (" + queue.length + " waiting)"; }
    else action();
  }
  function next() { if (queue.length) queue.shift()(); }
  function send(url, body, done) {
    busy = true;
    var t0 = performance.now();
    fetch(url, { method: "POST", credentials: "same-origin",
                 headers: { "Content-Type": "application/json", "X-CSRFToken": gal.dataset.csrf },
                 body: JSON.stringify(body || {}) })
      .then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        busy = false;
        if (!res[0]) {
          var dropped = queue.length ? " " + queue.length + " later key press(es) were not applied." : "";
          queue = [];
          status.textContent = ((res[1].error && res[1].error.message) || "Not saved.") + dropped;
          return;
        }
        res[1].cells.forEach(update);
        document.getElementById("differential").innerHTML = res[1].differential_html;
        var ms = Math.round(performance.now() - t0);
        status.textContent = (done ? "Saved" : "Undone: " + res[1].cells.length + " cell(s) restored") + " (" + ms + " ms).";
        gal.dataset.lastMs = String(ms);
        if (done) done();
        next();
      })
      .catch(function () {
        busy = false;
        queue = [];
        status.textContent = "Not saved: the server did not answer. Nothing was changed.";
      });
  }
  function update(c) {
    var el = document.getElementById("cell-" + c.id);
    if (!el) return;
    el.dataset.class = c["class"];
    el.classList.toggle("verified", c.verified);
    el.classList.toggle("changed", c["class"] !== c.ai_class);
    el.querySelector(".lab").textContent = c["class"].replace(/_/g, " ");
  }
  function assign(cls) {
    var sel = selection();
    if (!sel.length) sel = [cells[focus]];
    if (!cls) {  // Enter confirms what is shown; an unidentified cell needs a class, not a tick
      var open = sel.filter(function (el) { return el.dataset["class"] === "unidentified"; });
      if (open.length) {
        status.textContent = "Unidentified cells need a class: press its number key (2 keeps them unidentified).";
        if (open.length === sel.length) { next(); return; }
        sel = sel.filter(function (el) { return open.indexOf(el) < 0; });
      }
    }
    var changes = sel.map(function (el) {
      // "from": the class shown, so a change someone else made meanwhile is refused, not overwritten
      return { id: Number(el.dataset.id), "class": cls || el.dataset["class"], from: el.dataset["class"] };
    });
    var last = cells.indexOf(sel[sel.length - 1]);
    send(gal.dataset.patchUrl, { changes: changes }, function () { setFocus(nextUnverified(last), true); });
  }

  gal.addEventListener("keydown", function (e) {
    if (!cells.length || e.altKey) return;
    var k = e.key, step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow(), ArrowUp: -perRow() }[k];
    if (step) {
      e.preventDefault();
      var to = Math.max(0, Math.min(cells.length - 1, focus + step));
      if (e.shiftKey) { selectRange(anchor, to); setFocus(to, false); } else setFocus(to, true);
    } else if (KEYS[k] && !e.ctrlKey && !e.metaKey) { e.preventDefault(); var cls = KEYS[k]; run(function () { assign(cls); }); }
    else if (k === "Enter" || k === " ") { e.preventDefault(); run(function () { assign(null); }); }
    else if (k === "u" || (k === "z" && (e.ctrlKey || e.metaKey))) { e.preventDefault(); run(function () { send(gal.dataset.undoUrl); }); }
    else if (k === "a" && !e.ctrlKey) {
      e.preventDefault();
      var cls = cells[focus].dataset["class"];  // the current class (cells stay where they were drawn)
      cells.forEach(function (el) { toggle(el, el.dataset["class"] === cls); });
      showCount();
    }
  });
  // a link to one cell (a consult's cells link here) selects it
  for (var h = 0; h < cells.length; h++) if ("#" + cells[h].id === location.hash) { setFocus(h, true); break; }
  // Tabbing in starts at the first cell; a click starts at the clicked one (selecting the first cell on
  // mousedown would scroll the page and the click would land on another cell).
  var pointer = false;
  gal.addEventListener("mousedown", function () { pointer = true; });
  gal.addEventListener("focus", function () {
    if (!pointer && !gal.querySelector(".focus") && cells.length) setFocus(0, true);
    pointer = false;
  });
})();
