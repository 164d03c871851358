// modelserve dashboard: polls /v2/dashboard, diffs consecutive documents (cumulative counters and
// histogram buckets) into rates and percentiles, draws small SVG charts. No framework, no network but
// this server. `?interval=ms` changes the poll period (default 2000, at least 250).
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const INTERVAL = Math.max(250, Number(params.get("interval")) || 2000);
  const WINDOW_S = 10;        // headline rates and percentiles: over the last 10 s
  const HISTORY_S = 300;      // charts: the last 5 minutes
  const COLORS = ["#2f7de1", "#e8772e", "#2aa876", "#b04ad6", "#d6b12a", "#d63a5a", "#3bb3c4", "#7a7a7a"];
  const SVG = "http://www.w3.org/2000/svg";

  let history = [];           // [{t, doc}] oldest first
  let pid = null;
  let polls = 0;
  const colorOf = new Map();

  const $ = (id) => document.getElementById(id);
  const key = (v) => v.model + ":" + v.version;

  // -- formatting ------------------------------------------------------------------------------------------
  function fmtMs(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    const ms = s * 1000;
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 10) return ms.toFixed(1) + " ms";
    if (ms < 10000) return Math.round(ms) + " ms";
    return (s).toFixed(1) + " s";
  }
  function fmtRate(r) {
    if (r === null || r === undefined || !isFinite(r)) return "–";
    return r >= 100 ? Math.round(r).toString() : r >= 10 ? r.toFixed(1) : r.toFixed(2);
  }
  function fmtPct(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    return (x * 100).toFixed(digits === undefined ? 1 : digits) + " %";
  }
  function fmtBytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return (i ? b.toFixed(b < 10 ? 1 : 0) : b) + " " + units[i];
  }
  function fmtNum(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    return Number(x).toFixed(digits);
  }
  function fmtDuration(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k === "style") e.style.cssText = v;  // CSSOM: allowed by the page's CSP, unlike a style attribute
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  // a cell/number that a person reads (text) and a script reads (data-value)
  function metric(tag, name, text, value, extra) {
    return el(tag, Object.assign({"data-metric": name, "data-value": value === null || value === undefined ? "" : value,
                                   text: text}, extra || {}));
  }

  // -- numbers from two documents ------------------------------------------------------------------------
  // Prometheus's histogram_quantile over per-bucket counts (the last bucket is +Inf)
  function quantile(bounds, counts, q) {
    let total = 0;
    for (const c of counts) total += c;
    if (total <= 0) return null;
    const rank = q * total;
    let seen = 0;
    for (let i = 0; i < counts.length; i++) {
      const c = counts[i];
      if (c && seen + c >= rank) {
        if (i >= bounds.length) return bounds[bounds.length - 1];
        const lower = i ? bounds[i - 1] : 0;
        return lower + (bounds[i] - lower) * (rank - seen) / c;
      }
      seen += c;
    }
    return bounds[bounds.length - 1];
  }
  const diff = (a, b) => a.map((x, i) => Math.max(0, x - ((b && b[i]) || 0)));
  const versionIn = (doc, k) => doc.versions.find((v) => key(v) === k);

  // what happened to one version between two documents (old may be undefined: nothing yet)
  function interval(now, old, v) {
    const o = old && versionIn(old, key(v));
    const dt = old ? now.server.time - old.server.time : 0;
    if (!v.requests || !o || !o.requests || dt <= 0) return null;
    const total = v.requests.total - o.requests.total;
    const failed = v.requests.failure - o.requests.failure;
    const lat = diff(v.latency.total.counts, o.latency.total.counts);
    return {dt, requests: total, failed, rps: total / dt, errorRate: total > 0 ? failed / total : null,
            latCounts: lat};
  }
  // the document about WINDOW_S before the newest one (or the oldest one held)
  function windowStart() {
    const now = history[history.length - 1];
    for (let i = history.length - 2; i >= 0; i--) {
      if (now.t - history[i].t >= WINDOW_S) return history[i].doc;
    }
    return history.length > 1 ? history[0].doc : undefined;
  }

  // -- SVG line charts -------------------------------------------------------------------------------------
  function drawChart(svg, legend, series, unitFmt) {
    // series: [{name, color, points: [[t, y|null]], dashed}]
    while (svg.firstChild) svg.firstChild.remove();
    legend.textContent = "";
    const W = 400, H = 160, L = 44, R = 6, T = 8, B = 18;
    // the x axis spans what the page has seen, 30 s at least, 5 minutes at most
    const now = history.length ? history[history.length - 1].t : 0;
    const span = Math.min(HISTORY_S, Math.max(30, history.length ? now - history[0].t : 0));
    const t0 = now - span;
    let ymax = 0;
    for (const s of series) for (const [, y] of s.points) if (y !== null && y > ymax) ymax = y;
    ymax = niceMax(ymax);
    const x = (t) => L + (W - L - R) * (t - t0) / span;
    const y = (v) => T + (H - T - B) * (1 - v / ymax);
    for (let i = 0; i <= 4; i++) {
      const v = ymax * i / 4;
      svg.append(svgEl("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
      svg.append(svgEl("text", {x: L - 4, y: y(v) + 3, class: "axis", "text-anchor": "end"}, unitFmt(v)));
    }
    for (const [label, t] of [["-" + fmtAgo(span), t0], ["-" + fmtAgo(span / 2), t0 + span / 2], ["now", now]]) {
      svg.append(svgEl("text", {x: x(t), y: H - 4, class: "axis",
                                "text-anchor": t === t0 ? "start" : t === now ? "end" : "middle"}, label));
    }
    for (const s of series) {
      let d = "", pen = false;
      const pts = [];
      for (const [t, v] of s.points) {
        if (t < t0 || v === null) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
        pts.push(v);
      }
      const path = svgEl("path", {d, stroke: s.color, class: "line" + (s.dashed ? " dashed" : ""),
                                  "data-series": s.name, "data-points": pts.map((p) => +p.toPrecision(4)).join(",")});
      svg.append(path);
      const last = pts.length ? pts[pts.length - 1] : null;
      legend.append(el("span", {class: "key"}, el("i", {style: "background:" + s.color}),
                       s.name + " ", el("b", {text: last === null ? "–" : unitFmt(last)})));
    }
    svg.setAttribute("data-points", String(series.reduce((n, s) => n + s.points.filter((p) => p[1] !== null).length, 0)));
  }
  function fmtAgo(s) { return s >= 90 ? (s / 60).toFixed(s % 60 ? 1 : 0) + "m" : Math.round(s) + "s"; }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v * 1.05) return m * p;
    return 10 * p;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function colorFor(k) {
    if (!colorOf.has(k)) colorOf.set(k, COLORS[colorOf.size % COLORS.length]);
    return colorOf.get(k);
  }

  function renderCharts() {
    const rps = new Map(), errs = [], p50 = [], p99 = [];
    for (let i = 1; i < history.length; i++) {
      const now = history[i].doc, old = history[i - 1].doc, t = history[i].t;
      let req = 0, failed = 0;
      let lat = null;
      for (const v of now.versions) {
        const iv = interval(now, old, v);
        if (!iv) continue;
        if (!rps.has(key(v))) rps.set(key(v), []);
        rps.get(key(v)).push([t, iv.rps]);
        req += iv.requests; failed += iv.failed;
        lat = lat ? lat.map((c, j) => c + iv.latCounts[j]) : iv.latCounts.slice();
      }
      const bounds = now.buckets.latency_s;
      errs.push([t, req > 0 ? 100 * failed / req : null]);
      p50.push([t, lat ? ms(quantile(bounds, lat, 0.5)) : null]);
      p99.push([t, lat ? ms(quantile(bounds, lat, 0.99)) : null]);
    }
    const rate = (v) => fmtRate(v);
    drawChart($("chart-rps"), $("legend-rps"),
              [...rps.entries()].map(([k, points]) => ({name: k, color: colorFor(k), points})), rate);
    drawChart($("chart-latency"), $("legend-latency"),
              [{name: "p50", color: "#2f7de1", points: p50}, {name: "p99", color: "#e8772e", points: p99}],
              axisFmt);
    drawChart($("chart-errors"), $("legend-errors"), [{name: "errors", color: "#d63a5a", points: errs}], axisFmt);
  }
  const ms = (s) => (s === null ? null : s * 1000);
  const axisFmt = (v) => (v === 0 ? "0" : v < 1 ? v.toFixed(2) : v < 10 ? v.toFixed(1) : String(Math.round(v)));

  // -- the page ------------------------------------------------------------------------------------------
  function render(doc) {
    const start = windowStart();
    $("server-version").textContent = doc.server.version ? "v" + doc.server.version : "";
    $("uptime").textContent = fmtDuration(doc.server.uptime_s);
    const upd = $("updated");
    upd.textContent = new Date(doc.server.time * 1000).toLocaleTimeString();
    upd.setAttribute("data-polls", String(polls));
    const notes = $("notes");
    notes.hidden = !doc.server.notes.length;
    notes.textContent = doc.server.notes.join(" · ");
    const span = start ? doc.server.time - start.server.time : 0;
    $("rate-window").textContent = start ? "last " + (span < 10 ? span.toFixed(1) : Math.round(span)) + " s" : "needs two polls";

    // totals
    let rps = null, req = 0, failed = 0, total = 0, inflight = 0, queued = 0, lat = null;
    const cumulative = [];
    for (const v of doc.versions) {
      if (!v.requests) continue;
      total += v.requests.total; inflight += v.inflight || 0; queued += v.queue_depth || 0;
      cumulative.push(v.latency.total.counts);
      const iv = interval(doc, start, v);
      if (iv) {
        rps = (rps || 0) + iv.rps; req += iv.requests; failed += iv.failed;
        lat = lat ? lat.map((c, j) => c + iv.latCounts[j]) : iv.latCounts.slice();
      }
    }
    const bounds = doc.buckets.latency_s;
    const sumCounts = (list) => list.reduce((acc, c) => acc ? acc.map((x, j) => x + c[j]) : c.slice(), null);
    const latWindow = lat && lat.some((c) => c > 0) ? lat : null;
    const latAll = sumCounts(cumulative);
    const latUse = latWindow || latAll;
    replace("total-rps", metric("div", "total-rps", fmtRate(rps), rps, {class: "big", id: "total-rps"}));
    const er = req > 0 ? failed / req : null;
    replace("total-errors", metric("div", "total-error-rate", fmtPct(er), er,
                                   {class: "big" + (er > 0.05 ? " bad" : er > 0 ? " warn" : ""), id: "total-errors"}));
    for (const [id, q] of [["total-p50", 0.5], ["total-p99", 0.99]]) {
      const value = latUse ? quantile(bounds, latUse, q) : null;
      replace(id, metric("div", id, fmtMs(value), value, {class: "big", id,
                         title: latWindow ? "last " + WINDOW_S + " s" : "since start (no requests in the last seconds)"}));
    }
    replace("total-requests", metric("div", "total-requests", total.toLocaleString("en-US"), total,
                                     {class: "big", id: "total-requests"}));
    replace("total-inflight", metric("div", "total-inflight", inflight + " · " + queued, inflight,
                                     {class: "big", id: "total-inflight"}));

    renderTable(doc, start);
    renderCards(doc, start);
    renderResources(doc);
    renderCharts();
  }
  function replace(id, node) { $(id).replaceWith(node); }

  function stateBadge(state) {
    return el("span", {class: "badge state-" + state.toLowerCase(), "data-metric": "state", "data-value": state,
                       text: state});
  }
  function driftText(d) {
    if (!d) return ["–", null, ""];
    if (d.score === null || d.score === undefined) {
      const ref = d.reference || {};
      if (ref.error) return ["no reference", null, "bad"];
      return [ref.complete === false ? "reference " + (ref.samples || 0) : "window " + (d.window || 0), null, "dim"];
    }
    return [fmtNum(d.score, 3), d.score, d.alert ? "bad" : "good"];
  }
  function accuracyOf(q) {
    if (!q) return [null, "–"];
    if (q.accuracy !== null && q.accuracy !== undefined) return [q.accuracy, fmtPct(q.accuracy)];
    if (q.mae !== null && q.mae !== undefined) return [q.mae, "MAE " + fmtNum(q.mae, 3)];
    return [null, "–"];
  }

  function renderTable(doc, start) {
    const body = el("tbody", {id: "models-body"});
    if (!doc.versions.length) body.append(el("tr", {class: "empty"}, el("td", {colspan: 12, text: "no models"})));
    for (const v of doc.versions) {
      const iv = interval(doc, start, v);
      const bounds = doc.buckets.latency_s;
      const latCounts = iv && iv.latCounts.some((c) => c > 0) ? iv.latCounts : v.latency && v.latency.total.counts;
      const p50 = latCounts ? quantile(bounds, latCounts, 0.5) : null;
      const p99 = latCounts ? quantile(bounds, latCounts, 0.99) : null;
      const errs = iv ? iv.errorRate : v.requests && v.requests.total ? v.requests.failure / v.requests.total : null;
      const [acc, accText] = accuracyOf(v.quality);
      const [driftT, driftV, driftClass] = driftText(v.drift);
      const row = el("tr", {"data-model": v.model, "data-version": v.version, "data-state": v.state},
        el("td", {class: "model", text: v.model}), el("td", {text: v.version || "–"}), el("td", {}, stateBadge(v.state)),
        metric("td", "rps", iv ? fmtRate(iv.rps) : "–", iv ? iv.rps : null, {class: "num"}),
        metric("td", "requests", v.requests ? v.requests.total.toLocaleString("en-US") : "–",
               v.requests ? v.requests.total : null, {class: "num"}),
        metric("td", "error-rate", fmtPct(errs), errs, {class: "num" + (errs > 0.05 ? " bad" : "")}),
        metric("td", "p50", fmtMs(p50), p50, {class: "num"}),
        metric("td", "p99", fmtMs(p99), p99, {class: "num"}),
        metric("td", "batch-mean", v.batch && v.batch.mean !== null ? fmtNum(v.batch.mean, 1) : "–",
               v.batch ? v.batch.mean : null, {class: "num"}),
        metric("td", "queue", v.queue_depth === null || v.queue_depth === undefined ? "–" : String(v.queue_depth),
               v.queue_depth, {class: "num"}),
        metric("td", "accuracy", accText, acc, {class: "num"}),
        metric("td", "drift", driftT, driftV, {class: "num " + driftClass}));
      body.append(row);
    }
    $("models-body").replaceWith(body);
  }

  function renderCards(doc, start) {
    const cards = el("div", {id: "cards", class: "cards"});
    for (const v of doc.versions) {
      const card = el("article", {class: "card", "data-model": v.model, "data-version": v.version});
      card.append(el("h3", {}, v.model + " ", el("span", {class: "dim", text: "v" + (v.version || "?")}), " ",
                     stateBadge(v.state)));
      const row = el("div", {class: "card-stats"});
      const q = v.quality;
      if (q && q.kind === "classification") {
        row.append(stat("Accuracy", metric("div", "accuracy", fmtPct(q.accuracy), q.accuracy, {class: "big"}),
                        q.samples + " samples · F1 " + fmtNum(q.macro_f1, 3)));
      } else if (q && q.kind === "regression") {
        row.append(stat("MAE", metric("div", "mae", fmtNum(q.mae, 3), q.mae, {class: "big"}),
                        q.samples + " samples · RMSE " + fmtNum(q.rmse, 3)));
      } else {
        row.append(stat("Accuracy", metric("div", "accuracy", "–", null, {class: "big dim"}),
                        doc.server.payload_log ? "no feedback yet" : "payload log off"));
      }
      const d = v.drift;
      const [driftT, driftV, driftClass] = driftText(d);
      row.append(stat("Drift (max PSI)", metric("div", "drift", driftT, driftV, {class: "big " + driftClass,
                                                                       "data-alert": d ? String(d.alert) : ""}),
                      d ? (d.alert ? "ALERT · " : "") + "threshold " + fmtNum(d.threshold, 2) + " · " + (d.window || 0) + " rows"
                        : doc.server.drift ? "no data yet" : "not measured"));
      const iv = interval(doc, start, v);
      row.append(stat("Req/s", metric("div", "rps", iv ? fmtRate(iv.rps) : "–", iv ? iv.rps : null, {class: "big"}),
                      v.requests ? v.requests.success + " ok · " + v.requests.failure + " failed" : ""));
      card.append(row);
      if (d && d.top_features && d.top_features.length) {
        const list = el("ul", {class: "features"});
        for (const f of d.top_features) {
          list.append(el("li", {"data-feature": f.name}, el("span", {text: f.name}),
                         el("span", {class: "dim", text: "PSI " + fmtNum(f.psi, 3) + " · KS " + fmtNum(f.ks, 3)})));
        }
        card.append(el("div", {class: "label", text: "Drifting features"}), list);
      }
      if (v.latency) {
        const bounds = doc.buckets.latency_s;
        const stages = el("div", {class: "stages"});
        const o = start && versionIn(start, key(v));
        for (const s of doc.stages) {
          if (s === "total") continue;
          const counts = o && o.latency ? diff(v.latency[s].counts, o.latency[s].counts) : null;
          const use = counts && counts.some((c) => c > 0) ? counts : v.latency[s].counts;
          const p50 = quantile(bounds, use, 0.5);
          stages.append(el("div", {class: "stage"}, el("span", {class: "dim", text: s}),
                           metric("b", "stage-p50-" + s, fmtMs(p50), p50)));
        }
        card.append(el("div", {class: "label", text: "Stage latency p50"}), stages);
      }
      if (v.batch && v.batch.executions) card.append(el("div", {class: "label", text: "Batch sizes (rows per execution, since start)"}),
                                                      batchBars(v.batch, doc.buckets.batch));
      cards.append(card);
    }
    $("cards").replaceWith(cards);
  }
  function stat(label, value, sub) {
    return el("div", {class: "stat"}, el("div", {class: "label", text: label}), value, el("div", {class: "sub", text: sub}));
  }
  function batchBars(batch, bounds) {
    let last = 0;
    batch.counts.forEach((c, i) => { if (c) last = i; });
    const max = Math.max(...batch.counts);
    const bars = el("div", {class: "bars", "data-metric": "batch-sizes", "data-value": batch.counts.join(",")});
    for (let i = 0; i <= Math.max(last, 3) && i < batch.counts.length; i++) {
      const label = i >= bounds.length ? ">" + bounds[bounds.length - 1] : i && bounds[i] - bounds[i - 1] > 1 ? "≤" + bounds[i] : String(bounds[i]);
      const h = max ? Math.max(2, Math.round(60 * batch.counts[i] / max)) : 0;
      bars.append(el("div", {class: "bar", title: batch.counts[i] + " executions of " + label + " rows"},
                     el("span", {class: "count", text: batch.counts[i] ? String(batch.counts[i]) : ""}),
                     el("i", {style: "height:" + h + "px"}), el("span", {class: "dim", text: label})));
    }
    bars.append(el("div", {class: "sub", text: "mean " + fmtNum(batch.mean, 1) + " rows · " + batch.executions + " executions"}));
    return bars;
  }

  function gauge(name, label, text, fraction, sub) {
    const f = fraction === null || fraction === undefined || !isFinite(fraction) ? null : Math.max(0, Math.min(1, fraction));
    return el("div", {class: "gauge", "data-metric": name},
              el("div", {class: "label", text: label}),
              el("div", {class: "big", "data-value": f === null ? "" : f, text}),
              el("div", {class: "meter"}, el("i", {class: f > 0.9 ? "bad" : f > 0.7 ? "warn" : "",
                                                   style: "width:" + (f === null ? 0 : (100 * f).toFixed(1)) + "%"})),
              el("div", {class: "sub", text: sub || ""}));
  }
  function renderResources(doc) {
    const r = doc.resources;
    const box = el("div", {id: "resources", class: "gauges"});
    const prev = history.length > 1 ? history[history.length - 2].doc : null;
    let cpu = null;
    if (prev && prev.server.pid === doc.server.pid) {
      const dt = doc.server.time - prev.server.time;
      if (dt > 0) cpu = (r.cpu_seconds - prev.resources.cpu_seconds) / dt;
    }
    box.append(gauge("cpu", "CPU", cpu === null ? "–" : fmtPct(cpu, 0), cpu === null ? null : cpu / (r.cpus || 1),
                     "of one core · " + (r.cpus || "?") + " cores" + (r.load_average ? " · load " + r.load_average[0].toFixed(2) : "")));
    box.append(gauge("memory", "Memory (RSS)", fmtBytes(r.memory_rss_bytes),
                     r.memory_total_bytes ? r.memory_rss_bytes / r.memory_total_bytes : null,
                     r.memory_total_bytes ? "of " + fmtBytes(r.memory_total_bytes) : ""));
    box.append(gauge("threads", "Threads", String(r.threads), null, "open files " + (r.open_fds === null ? "–" : r.open_fds)));
    box.append(gauge("connections", "HTTP connections", r.http_connections === null ? "–" : String(r.http_connections), null, "open now"));
    for (const g of r.gpus || []) {
      box.append(gauge("gpu-util", "GPU " + g.gpu + " util", fmtPct(g.utilization, 0), g.utilization, g.name));
      box.append(gauge("gpu-memory", "GPU " + g.gpu + " memory", fmtBytes(g.memory_used_bytes),
                       g.memory_total_bytes ? g.memory_used_bytes / g.memory_total_bytes : null,
                       "of " + fmtBytes(g.memory_total_bytes)));
    }
    $("resources").replaceWith(box);
    $("resources-host").textContent = "pid " + doc.server.pid;
  }

  // -- polling -------------------------------------------------------------------------------------------
  function setConn(state, text) {
    $("conn").setAttribute("data-state", state);
    $("conn-text").textContent = text;
  }
  // With authentication on, the data needs a key: asked for once, kept for this tab only (sessionStorage)
  const KEY_ITEM = "modelserve-dashboard-key";
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("auth-key").value.trim());
    $("auth-key").value = "";
    $("auth-error").textContent = "checking…";
  });
  function askForKey(status) {
    $("auth").hidden = false;
    $("auth-error").textContent = sessionStorage.getItem(KEY_ITEM)
      ? (status === 403 ? "this key may not read every model's metrics" : "this key was refused") : "";
  }
  async function poll() {
    try {
      const key = sessionStorage.getItem(KEY_ITEM);
      const headers = key ? {"Authorization": "Bearer " + key} : {};
      const response = await fetch("v2/dashboard", {cache: "no-store", headers});
      if (response.status === 401 || response.status === 403) {
        askForKey(response.status);
        throw new Error("HTTP " + response.status + ": a key is needed");
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      $("auth").hidden = true;
      const doc = await response.json();
      if (pid !== null && doc.server.pid !== pid) history = [];  // a restarted server: counters start over
      const last = history[history.length - 1];
      if (last && doc.server.time < last.t) history = [];
      pid = doc.server.pid;
      polls++;
      history.push({t: doc.server.time, doc});
      while (history.length > 2 && history[0].t < doc.server.time - HISTORY_S - 2 * INTERVAL / 1000) history.shift();
      render(doc);
      setConn(doc.server.ready ? "ok" : "warn", doc.server.ready ? "live" : "server not ready");
    } catch (err) {
      setConn("bad", "no answer (" + err.message + "), retrying");
    } finally {
      setTimeout(poll, INTERVAL);
    }
  }
  $("interval").textContent = String(INTERVAL / 1000);
  poll();
})();
