// Case-page image viewer: click an image (original, cell mask or heatmap) to see it full-window at native
// resolution. One transform moves a stack of layers (original, cell mask, heatmap, ruler), so they stay aligned
// under any zoom and pan. Radiology images get window/level and invert (drawn on a canvas from the 8-bit
// greyscale original) and a distance tool, in mm when the DICOM header gave a pixel spacing.
// Progressive enhancement: without this script the page shows the images as they are.
(function () {
  "use strict";
  var dlg = document.getElementById("image-viewer");
  var sources = document.querySelectorAll(".viewer[data-viewer-image-id]");
  if (!dlg || !sources.length || typeof dlg.showModal !== "function") return;

  function $(sel) { return dlg.querySelector(sel); }
  var stage = $(".iv-stage"), stack = $(".iv-stack"), loading = $(".iv-loading"), cross = $(".iv-cross");
  var layer = { original: $(".iv-original"), grey: $(".iv-grey"), mask: $(".iv-mask"), heatmap: $(".iv-heat") };
  var ruler = $(".iv-ruler"), line = ruler.querySelector("line"), dots = ruler.querySelectorAll("circle");
  var box = {};
  dlg.querySelectorAll("input[data-layer]").forEach(function (el) { box[el.dataset.layer] = el; });
  var opacity = $("#iv-opacity"), opacityOut = $("#iv-opacity-value"), legend = $("#iv-legend");
  var win = $("#iv-window"), lvl = $("#iv-level"), invert = $("#iv-invert");
  var winOut = $("#iv-window-value"), lvlOut = $("#iv-level-value");
  var radiology = $(".iv-radiology"), measurePanel = $(".iv-measure"), measureBtn = $("[data-iv=measure]");
  var distance = $("#iv-distance"), spacingNote = $("#iv-spacing"), zoomOut = $("#iv-zoom-level");
  var title = $("#iv-title"), greyNote = radiology.querySelector("p"), greyNoteText = greyNote.textContent;

  var MAX_ZOOM = 32, MAX_GREY_PIXELS = 40e6;  // window/level keeps two copies of the pixels in memory
  var cur = null;          // the image shown: {w, h, spacing, radiology, heatmap, mask, layer, opacity}
  var view = { s: 1, x: 0, y: 0 };
  var opener = null, generation = 0;
  var grey = null;         // {luma: Uint8Array, image: ImageData} of the original, for window/level
  var points = [], measuring = false, drawPending = false;

  // ------------------------------------------------------------------ colour scale
  // The heatmap layer's colours, as oncoscope/analyzers/render.py's _jet makes them (channel * 255, truncated).
  function jet(v) {
    v = Math.max(0, Math.min(1, v));
    function ch(c) { return Math.floor(Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - c))) * 255); }
    return [ch(3), ch(2), ch(1)];
  }
  (function drawScale() {
    var c = $("#iv-scale"), ctx = c.getContext("2d");
    for (var x = 0; x < c.width; x++) {
      var rgb = jet(x / (c.width - 1));
      ctx.fillStyle = "rgb(" + rgb.join(",") + ")";
      ctx.fillRect(x, 0, 1, c.height);
    }
  })();

  // ------------------------------------------------------------------ zoom and pan
  function stageSize() { return [stage.clientWidth, stage.clientHeight]; }
  function fitScale() {
    var r = stageSize();
    return cur && cur.w ? Math.min(r[0] / cur.w, r[1] / cur.h) : 1;
  }
  function minZoom() { return Math.min(fitScale(), 1) / 2; }
  function apply() {
    if (!cur || !cur.w) return;
    var r = stageSize(), iw = cur.w * view.s, ih = cur.h * view.s, kx = Math.min(48, iw), ky = Math.min(48, ih);
    // never lose the image: at least 48 pixels of it (all of it, when it is smaller) stay in the window
    view.x = Math.max(kx - iw, Math.min(r[0] - kx, view.x));
    view.y = Math.max(ky - ih, Math.min(r[1] - ky, view.y));
    stack.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.s + ")";
    zoomOut.value = zoomOut.textContent = (view.s * 100 >= 10 ? Math.round(view.s * 100) : (view.s * 100).toFixed(1)) + "%";
    stage.classList.toggle("pixels", view.s >= 2);  // magnified: show the pixels, not a smoothed guess
    dots.forEach(function (d) { d.setAttribute("r", String(5 / view.s)); });
    stage.dataset.zoom = String(view.s);
    stage.dataset.pan = Math.round(view.x) + "," + Math.round(view.y);
  }
  function zoomAt(factor, cx, cy) {
    var s = Math.max(minZoom(), Math.min(MAX_ZOOM, view.s * factor));
    view.x = cx - (cx - view.x) * s / view.s;
    view.y = cy - (cy - view.y) * s / view.s;
    view.s = s;
    apply();
  }
  function zoomCentre(factor) { var r = stageSize(); zoomAt(factor, r[0] / 2, r[1] / 2); }
  function fit() {
    var r = stageSize();
    view.s = fitScale();
    view.x = (r[0] - cur.w * view.s) / 2;
    view.y = (r[1] - cur.h * view.s) / 2;
    apply();
  }
  function native() { zoomCentre(1 / view.s); }
  function pan(dx, dy) { view.x += dx; view.y += dy; apply(); }

  // ------------------------------------------------------------------ layers
  function setLayer(name, on) {
    var el = name === "original" && cur.radiology && grey ? layer.grey : layer[name];
    if (name !== "original" && !cur[name]) on = false;
    box[name].checked = on;
    el.hidden = !on;
    if (name === "original") (el === layer.grey ? layer.original : layer.grey).hidden = true;
  }
  function setOpacity(v) {
    opacity.value = v;
    layer.heatmap.style.opacity = String(v / 100);
    opacityOut.value = opacityOut.textContent = v + "%";
  }

  // ------------------------------------------------------------------ window / level (radiology)
  function prepareGrey() {
    var img = layer.original, w = img.naturalWidth, h = img.naturalHeight;
    if (w * h > MAX_GREY_PIXELS) { greyNote.textContent = "This image is too large for window/level here."; return; }
    var c = layer.grey, ctx = c.getContext("2d", { willReadFrequently: true });
    c.width = w; c.height = h;
    ctx.drawImage(img, 0, 0);
    var image = ctx.getImageData(0, 0, w, h), d = image.data, luma = new Uint8Array(w * h);
    for (var i = 0, j = 0; i < luma.length; i++, j += 4) luma[i] = Math.round(0.299 * d[j] + 0.587 * d[j + 1] + 0.114 * d[j + 2]);
    grey = { luma: luma, image: image, ctx: ctx };
    drawGrey();
  }
  function drawGrey() {
    var W = Number(win.value), level = Number(lvl.value), lo = level - W / 2, inv = invert.checked, lut = new Uint8Array(256);
    winOut.value = winOut.textContent = String(W);
    lvlOut.value = lvlOut.textContent = String(level);
    if (!grey) return;
    for (var v = 0; v < 256; v++) {
      var o = Math.round(Math.max(0, Math.min(1, (v - lo) / W)) * 255);  // clamp((v - (L - W/2)) / W) * 255
      lut[v] = inv ? 255 - o : o;
    }
    var d = grey.image.data, luma = grey.luma;
    for (var i = 0, j = 0; i < luma.length; i++, j += 4) { d[j] = d[j + 1] = d[j + 2] = lut[luma[i]]; }
    grey.ctx.putImageData(grey.image, 0, 0);
    stage.dataset.window = W + "/" + level + (inv ? "/inverted" : "");
  }
  function redrawGrey() {  // many slider or drag events per frame: one redraw
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(function () { drawPending = false; drawGrey(); });
  }
  function setWindow(W, level) {
    win.value = String(Math.max(Number(win.min), Math.min(Number(win.max), Math.round(W))));
    lvl.value = String(Math.max(Number(lvl.min), Math.min(Number(lvl.max), Math.round(level * 2) / 2)));
    redrawGrey();
  }

  // ------------------------------------------------------------------ distance
  function setMeasuring(on) {
    measuring = on && !measurePanel.hidden;
    measureBtn.setAttribute("aria-pressed", measuring ? "true" : "false");
    stage.classList.toggle("measuring", measuring);
    cross.hidden = !measuring;
    if (measuring && !points.length) distance.textContent = "Click the first point (or Enter at the cross).";
  }
  function addPoint(ix, iy) {
    var p = [Math.max(0, Math.min(cur.w, ix)), Math.max(0, Math.min(cur.h, iy))];
    points = points.length >= 2 ? [p] : points.concat([p]);
    showRuler();
  }
  function showRuler() {
    ruler.toggleAttribute("hidden", !points.length);  // an SVG element has no .hidden property
    var a = points[0], b = points[1] || points[0];
    if (a) {
      line.setAttribute("x1", a[0]); line.setAttribute("y1", a[1]); line.setAttribute("x2", b[0]); line.setAttribute("y2", b[1]);
      dots[0].setAttribute("cx", a[0]); dots[0].setAttribute("cy", a[1]);
      dots[1].setAttribute("cx", b[0]); dots[1].setAttribute("cy", b[1]);
    }
    if (points.length < 2) {
      distance.textContent = points.length ? "Click the second point." : "";
      delete stage.dataset.distance;
      return;
    }
    var dx = b[0] - a[0], dy = b[1] - a[1], px = Math.hypot(dx, dy), text;
    if (cur.spacing) {  // [row spacing (between rows: y), column spacing (x)] in mm
      var mm = Math.hypot(dx * cur.spacing[1], dy * cur.spacing[0]);
      text = (mm < 1 ? (mm * 1000).toFixed(1) + " µm" : mm.toFixed(1) + " mm") + " (" + px.toFixed(1) + " px)";
    } else text = px.toFixed(1) + " px (no pixel spacing known: not in mm)";
    distance.textContent = "Distance: " + text;
    stage.dataset.distance = text;
  }
  function toImage(clientX, clientY) {
    var r = stage.getBoundingClientRect();
    return [(clientX - r.left - view.x) / view.s, (clientY - r.top - view.y) / view.s];
  }

  // ------------------------------------------------------------------ open, reset, close
  function defaults() {
    setLayer("original", true);
    setLayer("mask", cur.layer === "mask");
    setLayer("heatmap", cur.layer === "heatmap");
    setOpacity(cur.opacity);
    invert.checked = false;
    setWindow(255, 127.5);  // the identity: the original's grey values as they are
    points = [];
    showRuler();
    setMeasuring(false);
    if (cur.w) fit();
  }
  function open(src, which, from) {
    var d = src.dataset, gen = ++generation;
    var page = src.querySelector("input.opacity");
    var spacing = (d.spacing || "").split(",").map(Number);
    cur = {
      w: 0, h: 0, layer: which, mask: d.mask || null, heatmap: d.heatmap || null,
      spacing: spacing.length === 2 && spacing.every(function (v) { return v > 0 && isFinite(v); }) ? spacing : null,
      radiology: /^radiology\//.test(d.modality || ""), opacity: page ? Number(page.value) : 60
    };
    opener = from;
    grey = null;
    title.textContent = d.title || "Image";
    ["mask", "heatmap"].forEach(function (k) {
      box[k].closest("label").hidden = !cur[k];
      if (cur[k]) layer[k].src = cur[k]; else layer[k].removeAttribute("src");
    });
    opacity.closest("label").hidden = legend.hidden = !cur.heatmap;
    radiology.hidden = !cur.radiology;
    greyNote.textContent = greyNoteText;
    measurePanel.hidden = !(cur.radiology || cur.spacing);
    spacingNote.textContent = cur.spacing
      ? "Pixel spacing " + cur.spacing[0] + " × " + cur.spacing[1] + " mm (rows × columns), from the DICOM header."
      : "No pixel spacing is known for this image (not a DICOM file, or its header states none): distances are in pixels.";
    stage.dataset.imageId = d.viewerImageId;
    loading.hidden = false;
    layer.grey.hidden = true;
    defaults();
    dlg.showModal();
    stage.focus();
    var img = layer.original;
    img.onload = function () {
      if (gen !== generation) return;  // an earlier image's late answer
      cur.w = img.naturalWidth; cur.h = img.naturalHeight;
      stack.style.width = cur.w + "px"; stack.style.height = cur.h + "px";
      ruler.setAttribute("viewBox", "0 0 " + cur.w + " " + cur.h);
      if (cur.radiology) prepareGrey();
      setLayer("original", box.original.checked);
      loading.hidden = true;
      fit();
      stage.dataset.ready = "1";
    };
    img.onerror = function () { if (gen === generation) loading.textContent = "The image could not be loaded."; };
    delete stage.dataset.ready;
    loading.textContent = "Loading…";
    img.removeAttribute("src");
    img.src = d.original;
  }
  dlg.addEventListener("close", function () {
    // The close event is queued, not sent at once: when the viewer was opened again before it arrived
    // (Esc, then Enter straight away), it belongs to the earlier opening and must not cancel this one's load.
    if (dlg.open) return;
    generation++;
    grey = null;
    layer.grey.width = layer.grey.height = 0;  // the pixels' copies are let go
    setMeasuring(false);
    if (opener && document.contains(opener)) opener.focus();
  });

  // ------------------------------------------------------------------ the page's images open it
  sources.forEach(function (src) {
    src.querySelectorAll("figure[data-viewer-layer]").forEach(function (fig) {
      var which = fig.dataset.viewerLayer;
      fig.querySelectorAll("img").forEach(function (img) {
        if (img.alt) {  // the heatmap's base copy of the original is decorative (alt=""): its layer takes the key
          img.tabIndex = 0;
          img.setAttribute("role", "button");
          img.setAttribute("aria-haspopup", "dialog");
          img.title = "Click to enlarge (zoom, pan" + (/^radiology\//.test(src.dataset.modality || "") ? ", window/level, measure" : "") + ")";
          img.addEventListener("keydown", function (e) {
            if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(src, which, img); }
          });
        }
        img.addEventListener("click", function () { open(src, which, img.alt ? img : fig.querySelector("img[alt]:not([alt=''])") || img); });
      });
    });
  });

  // ------------------------------------------------------------------ controls
  var actions = {
    "zoom-in": function () { zoomCentre(1.25); }, "zoom-out": function () { zoomCentre(0.8); },
    fit: fit, native: native, reset: defaults, close: function () { dlg.close(); },
    measure: function () { setMeasuring(!measuring); }
  };
  dlg.querySelectorAll("[data-iv]").forEach(function (b) {
    b.addEventListener("click", function () { if (cur && cur.w || b.dataset.iv === "close") actions[b.dataset.iv](); });
  });
  Object.keys(box).forEach(function (k) { box[k].addEventListener("change", function () { setLayer(k, box[k].checked); }); });
  opacity.addEventListener("input", function () { setOpacity(Number(opacity.value)); });
  [win, lvl].forEach(function (el) { el.addEventListener("input", redrawGrey); });
  invert.addEventListener("change", redrawGrey);

  stage.addEventListener("wheel", function (e) {
    if (!cur || !cur.w) return;
    e.preventDefault();
    var r = stage.getBoundingClientRect(), dy = e.deltaY * (e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 400 : 1);
    zoomAt(Math.exp(-dy * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  stage.addEventListener("contextmenu", function (e) { e.preventDefault(); });

  var drag = null;  // {button, x, y, moved, window, level}
  stage.addEventListener("pointerdown", function (e) {
    if (!cur || !cur.w || (e.button !== 0 && e.button !== 2)) return;
    if (e.button === 2 && !(cur.radiology && grey)) return;
    e.preventDefault();
    stage.focus();
    stage.setPointerCapture(e.pointerId);
    drag = { button: e.button, x: e.clientX, y: e.clientY, sx: e.clientX, sy: e.clientY, moved: 0,
             window: Number(win.value), level: Number(lvl.value) };
    stage.classList.add(e.button === 0 ? "dragging" : "levelling");
  });
  stage.addEventListener("pointermove", function (e) {
    if (!drag) return;
    drag.moved = Math.max(drag.moved, Math.hypot(e.clientX - drag.sx, e.clientY - drag.sy));
    if (drag.button === 0) pan(e.clientX - drag.x, e.clientY - drag.y);
    else setWindow(drag.window + (e.clientX - drag.sx), drag.level + (e.clientY - drag.sy) / 2);  // right: wider; down: darker
    drag.x = e.clientX; drag.y = e.clientY;
  });
  function endDrag(e) {
    if (!drag) return;
    if (drag.button === 0 && drag.moved < 4 && measuring && e.type === "pointerup") {
      var p = toImage(e.clientX, e.clientY);
      addPoint(p[0], p[1]);
    }
    drag = null;
    stage.classList.remove("dragging", "levelling");
  }
  stage.addEventListener("pointerup", endDrag);
  stage.addEventListener("pointercancel", endDrag);

  dlg.addEventListener("keydown", function (e) {
    e.stopPropagation();  // the page's own shortcut keys (workflow.js: n, a, o, s) never act behind the viewer
    if (!cur || !cur.w || e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target, inField = t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA";
    var onControl = inField || t.tagName === "BUTTON" || t.tagName === "SUMMARY";
    var k = e.key, step = e.shiftKey ? 200 : 50;
    var arrows = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    if (arrows[k] && !inField) { e.preventDefault(); pan(arrows[k][0], arrows[k][1]); return; }  // the view moves the arrow's way
    if ((k === "Enter" || k === " ") && t === stage && measuring) {
      e.preventDefault();
      var r = stage.getBoundingClientRect();
      var p = toImage(r.left + r.width / 2, r.top + r.height / 2);
      addPoint(p[0], p[1]);
      return;
    }
    if (inField && !(t.type === "checkbox" || t.type === "range")) return;
    if (onControl && (k === "Enter" || k === " ")) return;
    var keys = {
      "+": function () { zoomCentre(1.25); }, "=": function () { zoomCentre(1.25); },
      "-": function () { zoomCentre(0.8); }, "_": function () { zoomCentre(0.8); },
      "0": fit, "1": native, r: defaults,
      h: function () { if (cur.heatmap) setLayer("heatmap", !box.heatmap.checked); },
      i: function () { if (cur.radiology && grey) { invert.checked = !invert.checked; redrawGrey(); } },
      m: function () { setMeasuring(!measuring); }
    };
    if (keys[k]) { e.preventDefault(); keys[k](); }
  });
  window.addEventListener("resize", function () { if (dlg.open && cur && cur.w) apply(); });
})();
