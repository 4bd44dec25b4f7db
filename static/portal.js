// Small behaviours shared by the portal's pages.
(function () {
  // Keep log panes scrolled to their newest line after each refresh.
  function stickToBottom(root) {
    root.querySelectorAll("[data-stick-bottom], #serial-log").forEach(function (el) {
      el.scrollTop = el.scrollHeight;
    });
  }
  document.addEventListener("DOMContentLoaded", function () { stickToBottom(document); });
  document.body && document.body.addEventListener("htmx:afterSettle", function () { stickToBottom(document); });

  // What inline handlers did before the Content-Security-Policy forbade them (portal/security.py).
  // A form or a button with data-confirm asks first; in a form's question, "{action}" is the text of its
  // selected action. Capturing on the document runs this before any other submit handler (htmx, uploads).
  function confirmed(question, form) {
    var select = form && form.querySelector("select[name=action]");
    if (select) question = question.replace("{action}", select.options[select.selectedIndex].text);
    return window.confirm(question);
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("button[data-confirm]");
    if (button && !button.disabled && !confirmed(button.dataset.confirm, null)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (event.submitter && event.submitter.hasAttribute("data-skip-confirm")) return;
    if (form.dataset.confirm && !confirmed(form.dataset.confirm, form)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
  // A list that refreshes itself (htmx) keeps the boxes ticked in it: those checked before the swap are
  // checked again after it, so a selection survives the machine list's live refresh.
  var ticked = null;
  document.addEventListener("htmx:beforeSwap", function (event) {
    var boxes = event.detail.target.querySelectorAll && event.detail.target.querySelectorAll("input[name=ids]:checked");
    ticked = boxes && boxes.length ? Array.prototype.map.call(boxes, function (b) { return b.value; }) : null;
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (!ticked) return;
    ticked.forEach(function (v) {
      var box = document.querySelector("input[name=ids][value='" + CSS.escape(v) + "']");
      if (box) box.checked = true;
    });
    ticked = null;
  });
  // A checkbox with data-select-all="<selector>" sets every box the selector finds.
  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.matches("input[data-select-all]")) return;
    document.querySelectorAll(box.dataset.selectAll).forEach(function (c) { c.checked = box.checked; });
  });
  // An image with data-hide-on-error disappears when it cannot load (error events do not bubble: captured),
  // also when it failed before this script ran.
  function hideIfBroken(img) { img.style.visibility = "hidden"; }
  document.addEventListener("error", function (event) {
    if (event.target.matches && event.target.matches("img[data-hide-on-error]")) hideIfBroken(event.target);
  }, true);
  document.querySelectorAll("img[data-hide-on-error]").forEach(function (img) {
    if (img.complete && img.naturalWidth === 0) hideIfBroken(img);
  });

  // Upload with a progress bar: forms marked data-upload-progress post by XHR.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches("form[data-upload-progress]")) return;
    var file = form.querySelector("input[type=file]");
    if (!file || !file.files.length || !form.querySelector("input[name=source][value=upload]:checked")) return;
    event.preventDefault();
    var bar = document.getElementById("upload-progress");
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.setRequestHeader("HX-Request", "true");
    bar.parentElement.classList.remove("d-none");
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var pct = Math.round(100 * e.loaded / e.total);
      bar.style.width = pct + "%";
      bar.textContent = pct + "%";
    });
    xhr.addEventListener("load", function () {
      var target = xhr.getResponseHeader("HX-Redirect");
      if (target) { window.location.href = target; return; }
      document.open(); document.write(xhr.responseText); document.close();
    });
    xhr.addEventListener("error", function () { bar.classList.add("bg-danger"); bar.textContent = "Upload failed"; });
    xhr.send(new FormData(form));
  });
})();
