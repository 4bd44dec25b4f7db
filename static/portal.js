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
