// The Metrics cards of the machine and hypervisor pages (templates/metrics/): uPlot graphs of the JSON at the
// card's data-metrics-url (metrics/series.py: columnar, a slot per interval, null where nothing was measured, so
// a stopped period is a gap). Hour, day and month buttons; while the tab is visible, the card asks every 30 s
// for the slots after its last point (since=) and replaces what it holds after that point with the answer.
(function () {
  "use strict";
  var POLL_MS = 30000;
  var WINDOW_SECONDS = { hour: 3600, day: 86400, month: 30 * 86400 };
  var COLORS = { a: "#0d6efd", b: "#fd7e14", given: "#6c757d" };

  function bytes(value) {
    if (value == null) return "–";
    var units = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    var i = 0;
    while (Math.abs(value) >= 1024 && i < units.length - 1) { value /= 1024; i++; }
    return (i ? value.toFixed(1) : Math.round(value)) + " " + units[i];
  }
  function mib(value) {
    if (value == null) return "–";
    return value >= 10240 ? (value / 1024).toFixed(1) + " GiB" : Math.round(value) + " MiB";
  }
  function pct(value) { return value == null ? "–" : value.toFixed(1) + " %"; }
  function count(value) { return value == null ? "–" : String(Math.round(value)); }

  // Per kind of card, each graph: its series (the JSON's names), how its values read, its y range.
  var GRAPHS = {
    machine: {
      cpu: { fmt: pct, max: 100, series: [["cpu_pct", "CPU", COLORS.a]] },
      memory: { fmt: mib, series: [["memory_used_mib", "used", COLORS.a], ["memory_mib", "given", COLORS.given, true]] },
      disk: { fmt: bytes, series: [["disk_read_bps", "read", COLORS.a], ["disk_write_bps", "write", COLORS.b]] },
      net: { fmt: bytes, series: [["net_rx_bps", "rx", COLORS.a], ["net_tx_bps", "tx", COLORS.b]] },
    },
    host: {
      cpu: { fmt: pct, max: 100, series: [["cpu_pct", "CPU", COLORS.a]] },
      memory: { fmt: mib, series: [["memory_used_mib", "used", COLORS.a], ["memory_total_mib", "total", COLORS.given, true]] },
      vcpus: { fmt: count, series: [["vcpus_allocated", "given", COLORS.a], ["vcpus_capacity", "capacity", COLORS.given, true]] },
      allocation: { fmt: mib, series: [["memory_allocated_mib", "given", COLORS.a], ["memory_capacity_mib", "capacity", COLORS.given, true]] },
    },
  };

  function hasPoint(series, i) {
    for (var name in series) if (series[name][i] != null) return true;
    return false;
  }
  function anyPoint(data) {
    for (var i = 0; i < data.timestamps.length; i++) if (hasPoint(data.series, i)) return true;
    return false;
  }
  // The timestamp of the last slot with a point: where the next update starts (null: ask for the whole window).
  function lastPoint(data) {
    for (var i = data.timestamps.length - 1; i >= 0; i--) if (hasPoint(data.series, i)) return data.timestamps[i];
    return null;
  }

  function Card(el) {
    this.el = el;
    this.url = el.dataset.metricsUrl;
    this.graphs = GRAPHS[el.dataset.metricsKind] || {};
    this.window = "hour";
    this.data = null;
    this.plots = {};
    this.request = 0;
    var card = this;
    el.querySelectorAll("[data-window]").forEach(function (button) {
      button.addEventListener("click", function () { card.show(button.dataset.window); });
    });
    this.show("hour");
    this.timer = setInterval(function () { if (!document.hidden) card.update(); }, POLL_MS);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) card.update(); });
    var resizing = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizing);
      resizing = setTimeout(function () { card.resize(); }, 150);
    });
  }

  Card.prototype.fetch = function (since) {
    var url = this.url + "?window=" + encodeURIComponent(this.window) + (since != null ? "&since=" + since : "");
    var request = ++this.request;
    var card = this;
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (json) { return request === card.request ? json : null; })  // a newer request won
      .catch(function () {
        if (request === card.request) card.state("error");
        return null;
      });
  };

  Card.prototype.show = function (name) {
    this.window = name;
    this.el.querySelectorAll("[data-window]").forEach(function (button) {
      var on = button.dataset.window === name;
      button.classList.toggle("active", on);
      button.setAttribute("aria-pressed", on ? "true" : "false");
    });
    this.el.dataset.metricsWindow = name;
    this.state("loading");
    var card = this;
    this.fetch(null).then(function (json) {
      if (!json) return;
      card.data = json;
      card.draw();
    });
  };

  // The slots after the last point, merged: what was held after it is replaced, what fell out of the window dropped.
  Card.prototype.update = function () {
    if (!this.data) return this.show(this.window);
    var since = lastPoint(this.data);
    if (since == null) return this.show(this.window);
    var card = this;
    this.fetch(since).then(function (json) {
      if (!json || json.window !== card.window) return;
      var old = card.data, keep = 0;
      while (keep < old.timestamps.length && old.timestamps[keep] <= since) keep++;
      var first = json.end - WINDOW_SECONDS[card.window] + json.step;
      var from = 0;
      while (from < keep && old.timestamps[from] < first) from++;
      var merged = { window: json.window, step: json.step, end: json.end, series: {} };
      merged.timestamps = old.timestamps.slice(from, keep).concat(json.timestamps);
      for (var name in old.series) {
        merged.series[name] = old.series[name].slice(from, keep).concat(json.series[name] || []);
      }
      card.data = merged;
      card.draw();
    });
  };

  Card.prototype.state = function (state) {
    this.el.dataset.metricsState = state;
    this.el.querySelector(".metrics-error").hidden = state !== "error";
    this.el.querySelector(".metrics-empty").hidden = state !== "empty";
    this.el.querySelector(".metrics-graphs").hidden = state === "empty";
  };

  Card.prototype.columns = function (graph) {
    var data = this.data;
    return [data.timestamps].concat(graph.series.map(function (s) { return data.series[s[0]] || []; }));
  };

  // The y axis as wide as its longest label ("8000 MiB", "1.8 MiB/s"), so that none is cut.
  function labelWidth(u, values) {
    var longest = 0;
    (values || []).forEach(function (v) { longest = Math.max(longest, String(v).length); });
    return Math.max(40, longest * 7 + 20);
  }

  Card.prototype.options = function (graph, width) {
    var fmt = graph.fmt;
    return {
      width: width,
      height: 170,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: graph.max ? { range: [0, graph.max] } : { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      axes: [
        { stroke: "#6c757d", grid: { stroke: "rgba(0,0,0,.06)" } },
        { stroke: "#6c757d", size: labelWidth, grid: { stroke: "rgba(0,0,0,.06)" }, values: function (u, ticks) { return ticks.map(fmt); } },
      ],
      series: [{}].concat(graph.series.map(function (s) {
        return {
          label: s[1],
          stroke: s[2],
          width: 1.5,
          dash: s[3] ? [4, 4] : undefined,
          fill: s[3] ? undefined : s[2] + "1f",
          spanGaps: false,  // a slot without a point is a gap (a stopped machine), never a line across it
          value: function (u, v) { return fmt(v); },
        };
      })),
    };
  };

  Card.prototype.draw = function () {
    var card = this;
    if (!anyPoint(this.data)) {
      this.state("empty");
      this.updated();
      return;
    }
    this.state("drawn");  // visible before drawing: uPlot measures nothing, but the width below needs layout
    Object.keys(this.graphs).forEach(function (key) {
      var graph = card.graphs[key];
      var box = card.el.querySelector('[data-graph="' + key + '"]');
      if (!box) return;
      var data = card.columns(graph);
      if (card.plots[key]) {
        card.plots[key].setData(data);
      } else {
        card.plots[key] = new uPlot(card.options(graph, Math.max(box.clientWidth, 200)), data, box);
      }
    });
    this.el.dataset.metricsDrawn = this.window;
    this.updated();
  };

  Card.prototype.updated = function () {
    var label = this.el.querySelector(".metrics-updated");
    if (label) label.textContent = "updated " + new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  };

  Card.prototype.resize = function () {
    var card = this;
    Object.keys(this.plots).forEach(function (key) {
      var box = card.el.querySelector('[data-graph="' + key + '"]');
      if (box && box.clientWidth) card.plots[key].setSize({ width: box.clientWidth, height: 170 });
    });
  };

  function start() {
    if (typeof uPlot === "undefined") return;
    document.querySelectorAll("[data-metrics-url]").forEach(function (el) {
      if (!el.metricsCard) el.metricsCard = new Card(el);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
