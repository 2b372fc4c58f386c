// Cell thumbnails: each ".cell" with data-image/-x/-y shows its picture from its image's sprite (one
// JPEG per image), fetched when the cell comes near the screen. Set here: the CSP forbids inline styles.
// Used by the gallery and by a consult's cells (containers marked data-sprites).
window.OncoscopeThumbs = (function () {
  "use strict";
  function paint(el, images, thumb, columns) {
    var s = el.clientWidth / thumb;  // the thumbnail's inner box (the border is not background area)
    el.style.backgroundImage = "url(" + images[el.dataset.image].sprite + ")";
    el.style.backgroundSize = (columns * thumb * s) + "px auto";
    el.style.backgroundPosition = (-el.dataset.x * s) + "px " + (-el.dataset.y * s) + "px";
  }
  function lazy(box) {
    var images = JSON.parse(box.dataset.images), thumb = Number(box.dataset.thumb);
    var columns = Number(box.dataset.columns);
    var cells = Array.prototype.slice.call(box.querySelectorAll(".cell"));
    var one = function (el) { paint(el, images, thumb, columns); };
    if (!("IntersectionObserver" in window)) { cells.forEach(one); return; }
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (en) { if (en.isIntersecting) { one(en.target); seen.unobserve(en.target); } });
    }, { rootMargin: "400px" });
    cells.forEach(function (el) { seen.observe(el); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("[data-sprites]"), lazy);
  return { lazy: lazy };
})();
