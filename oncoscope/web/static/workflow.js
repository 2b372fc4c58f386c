// Worklists and the case page's workflow: keyboard shortcuts, and the box a consult points at.
// Progressive enhancement: every action is also a link, a select or a button.
(function () {
  "use strict";

  function typing(e) {
    var t = e.target;
    if (document.querySelector("dialog[open]")) return true;  // the image viewer has the keys
    return e.ctrlKey || e.metaKey || e.altKey || (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName)));
  }

  // A select that sends its form when changed (the worklist's sort); inline handlers are refused by
  // the content security policy, so the listener lives here.
  document.querySelectorAll("select[data-autosubmit]").forEach(function (sel) {
    sel.addEventListener("change", function () { sel.form.submit(); });
  });

  // A consult's box, stored as percentages of its image (inline styles are refused by the policy too).
  document.querySelectorAll(".box[data-box]").forEach(function (box) {
    var v = box.dataset.box.split(",");
    box.style.left = v[0] + "%"; box.style.top = v[1] + "%"; box.style.width = v[2] + "%"; box.style.height = v[3] + "%";
  });

  // Worklist: j / k move the selection, Enter opens the selected case.
  var list = document.querySelector("table[data-worklist] tbody");
  if (list) {
    var rows = Array.prototype.filter.call(list.rows, function (r) { return r.querySelector("a"); });
    var at = -1;
    var select = function (i) {
      if (!rows.length) return;
      if (at >= 0) rows[at].classList.remove("selected");
      at = Math.max(0, Math.min(rows.length - 1, i));
      rows[at].classList.add("selected");
      rows[at].scrollIntoView({ block: "nearest" });
    };
    document.addEventListener("keydown", function (e) {
      if (typing(e)) return;
      if (e.key === "j") { select(at + 1); e.preventDefault(); }
      else if (e.key === "k") { select(at - 1); e.preventDefault(); }
      else if (e.key === "Enter" && at >= 0) { window.location = rows[at].querySelector("a").href; e.preventDefault(); }
    });
  }

  // Case page: n next case, a agree with the AI, o override, s sign (tick the confirmation first).
  var sign = document.querySelector("#sign form");
  var next = document.getElementById("next-case");
  document.addEventListener("keydown", function (e) {
    if (list || typing(e)) return;
    var dx = sign && sign.querySelector("select[name=final_diagnosis]");
    if (e.key === "n" && next) { window.location = next.href; }
    else if (e.key === "a" && dx && sign.dataset.ai) { dx.value = sign.dataset.ai; dx.dispatchEvent(new Event("change")); focusConfirm(); }
    else if (e.key === "o" && dx) { dx.focus(); dx.scrollIntoView({ block: "center" }); }
    else if (e.key === "s" && sign) {
      var confirm = sign.querySelector("input[name=confirm]");
      if (confirm && !confirm.checked) { focusConfirm(); } else { sign.requestSubmit(); }
    } else { return; }
    e.preventDefault();
  });
  function focusConfirm() {
    var c = sign.querySelector("input[name=confirm]");
    if (c) { c.focus(); c.scrollIntoView({ block: "center" }); }
  }

  // Consult form: choose an image, then drag a box on it; the box goes in image pixels to the hidden field.
  var form = document.querySelector("form.consult-form");
  if (!form) return;
  var chooser = form.querySelector("select[name=image_id]");
  var picker = form.querySelector(".region-picker");
  var field = form.querySelector("input[name=region]");
  var text = picker && picker.querySelector(".region-text");
  if (!chooser || !picker || !field) return;
  function show() {
    var id = chooser.value;
    picker.hidden = !id || id === "0";
    picker.querySelectorAll(".region-image").forEach(function (el) { el.hidden = el.dataset.imageId !== id; });
    field.value = "";
    picker.querySelectorAll(".box").forEach(function (b) { b.hidden = true; });
    if (text) text.textContent = "No box drawn: drag on the image to point at a region (optional).";
  }
  chooser.addEventListener("change", show);
  show();
  picker.querySelectorAll(".region-image").forEach(function (wrap) {
    var img = wrap.querySelector("img"), box = wrap.querySelector(".box"), start = null;
    function point(e) {
      var r = img.getBoundingClientRect();
      return { x: Math.max(0, Math.min(r.width, e.clientX - r.left)), y: Math.max(0, Math.min(r.height, e.clientY - r.top)), w: r.width, h: r.height };
    }
    wrap.addEventListener("pointerdown", function (e) { start = point(e); wrap.setPointerCapture(e.pointerId); e.preventDefault(); });
    wrap.addEventListener("pointermove", function (e) {
      if (!start) return;
      var p = point(e), x = Math.min(start.x, p.x), y = Math.min(start.y, p.y);
      var w = Math.abs(p.x - start.x), h = Math.abs(p.y - start.y);
      box.hidden = false;
      box.style.left = x + "px"; box.style.top = y + "px"; box.style.width = w + "px"; box.style.height = h + "px";
      var sx = wrap.dataset.width / p.w, sy = wrap.dataset.height / p.h;
      var px = [Math.round(x * sx), Math.round(y * sy), Math.max(1, Math.round(w * sx)), Math.max(1, Math.round(h * sy))];
      field.value = px.join(",");
      if (text) text.textContent = "Box: x " + px[0] + ", y " + px[1] + ", " + px[2] + "×" + px[3] + " px of the image.";
    });
    wrap.addEventListener("pointerup", function () { start = null; });
  });
})();
