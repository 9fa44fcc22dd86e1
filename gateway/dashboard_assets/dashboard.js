// fairgate live dashboard: draws the snapshots the gateway sends (gateway/dashboard_snapshot.py)
// as cards, tables and plain SVG line charts. No library, no build step. Tenant names and worker
// ids are data, never markup: everything is written with textContent / setAttribute.
// Every figure sits in an element with data-field (its name) and data-value (the raw number), so
// that tests read the page as the server sent it.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#5aa9ff", "#ff7ab6", "#ffc857", "#3ddc97", "#b68cff", "#ff9f43", "#4dd4e8",
    "#ff5d73", "#a3d977", "#f6a6ff"];
  const STALE_MS = 5000; // no snapshot for this long: say so
  const colors = new Map(); // tenant name -> colour, kept for the page's life
  let lastUpdate = 0;
  let source = null;

  // ---- small helpers ------------------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function colorOf(name) {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
    return colors.get(name);
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    const places = digits === undefined ? (a >= 100 ? 0 : a >= 10 ? 1 : 2) : digits;
    return v.toLocaleString("en-US", { maximumFractionDigits: places });
  }

  function fmtPct(v) {
    if (v === null || v === undefined) return "—";
    const p = v * 100;
    return (p === 100 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  function level(v, good, warn) {
    if (v === null || v === undefined) return "";
    return v >= good ? "good" : v >= warn ? "warn" : "bad";
  }

  // An element showing one figure: text for people, data-* for tests.
  function figure(tag, field, value, text, cls) {
    const node = el(tag, { "data-field": field, "data-value": value === null || value === undefined ? "" : String(value) }, text);
    if (cls) node.className = cls;
    return node;
  }

  // ---- cards --------------------------------------------------------------------------------

  function card(label, field, value, text, sub, cls) {
    const node = el("div", { class: "card" });
    node.append(el("div", { class: "card-label" }, label));
    node.append(figure("div", field, value, text, "card-value " + (cls || "")));
    if (sub) node.append(sub);
    return node;
  }

  function classList(prefix, values, fmt) {
    const sub = el("div", { class: "card-sub" });
    const names = Object.keys(values).sort();
    if (!names.length) sub.textContent = "none in the window";
    names.forEach((name, i) => {
      if (i) sub.append(" · ");
      sub.append(name + " ");
      sub.append(figure("span", prefix + "." + name, values[name], fmt(values[name])));
    });
    return sub;
  }

  function worst(values) {
    const all = Object.values(values);
    return all.length ? Math.min(...all) : null;
  }

  function renderCards(s) {
    const o = s.overall;
    const root = document.getElementById("cards");
    const sub = (parts) => {
      const node = el("div", { class: "card-sub" });
      parts.forEach((p) => node.append(p));
      return node;
    };
    const ttftWorst = worst(o.ttft_attainment);
    const tpotWorst = worst(o.tpot_attainment);
    const ttftSub = classList("ttft", o.ttft_attainment, fmtPct);
    const states = {};
    s.workers.forEach((w) => { states[w.state] = (states[w.state] || 0) + 1; });
    root.replaceChildren(
      card("Jain's index", "jain", o.jain, o.jain === null ? "—" : o.jain.toFixed(3),
        sub(["last " + fmtNum(o.window_s) + " s"]), level(o.jain, 0.95, 0.8)),
      card("Output tokens/s", "output_tokens_s", o.output_tokens_s, fmtNum(o.output_tokens_s),
        sub([figure("span", "completion_tokens", o.completion_tokens, fmtNum(o.completion_tokens)), " generated"])),
      card("Prompt tokens/s", "prompt_tokens_s", o.prompt_tokens_s, fmtNum(o.prompt_tokens_s),
        sub([figure("span", "prompt_tokens", o.prompt_tokens, fmtNum(o.prompt_tokens)), " prompt tokens"])),
      card("Queued", "queue_depth", o.queue_depth, fmtNum(o.queue_depth),
        sub([figure("span", "in_gateway", o.in_gateway, fmtNum(o.in_gateway)), " in the gateway"])),
      card("Workers ready", "num_workers_ready", o.num_workers_ready,
        o.num_workers_ready + " / " + o.num_workers,
        sub([Object.keys(states).sort().map((k) => states[k] + " " + k).join(" · ") || "none known"]),
        o.num_workers && o.num_workers_ready === o.num_workers ? "good" : "warn"),
      card("TTFT attainment", "ttft_worst", ttftWorst, fmtPct(ttftWorst), ttftSub, level(ttftWorst, 0.95, 0.8)),
      card("TPOT attainment", "tpot_worst", tpotWorst, fmtPct(tpotWorst),
        classList("tpot", o.tpot_attainment, fmtPct), level(tpotWorst, 0.95, 0.8)),
      card("Rejections", "rejections", o.rejections, fmtNum(o.rejections),
        sub([figure("span", "preemptions", o.preemptions, fmtNum(o.preemptions)), " preemptions"]),
        o.rejections > 0 ? "warn" : ""),
    );
  }

  // ---- charts -------------------------------------------------------------------------------

  // A trailing mean over SMOOTH_POINTS points (about seconds): service is counted when a
  // request's tokens come back, so one-second intervals are bursty.
  const SMOOTH_POINTS = 5;
  function smooth(points) {
    return points.map((p, i) => {
      const recent = points.slice(Math.max(0, i - SMOOTH_POINTS + 1), i + 1).filter((q) => q.v !== null);
      if (p.v === null || !recent.length) return { t: p.t, v: null };
      return { t: p.t, v: recent.reduce((sum, q) => sum + q.v, 0) / recent.length };
    });
  }

  // Each tenant's points as [{t, v}] (v null: a gap), from (t, rate, entitled, received).
  function chartSeries(tenants, kind) {
    const pick = {
      rate: ([, rate]) => rate,
      received: ([, , , received]) => received,
      entitled: ([, , entitled]) => entitled,
    }[kind];
    return tenants.map((tenant) => ({
      name: tenant.name,
      points: smooth(tenant.history.map((p) => ({ t: p[0], v: pick(p) }))),
    }));
  }

  // The fair rate in service units/s: every backlogged tenant's, the same (service is divided
  // by the weight), = their cost rate over their weights = the weighted mean of their rates.
  // Weighted by each tenant's weight now (a weight changed within the chart's span is not
  // redrawn).
  function fairRate(tenants) {
    const sums = new Map(); // t -> [Σ rate·w, Σ w] over the tenants backlogged then
    tenants.forEach((tenant) => tenant.history.forEach(([t, rate, entitled]) => {
      if (entitled === null || tenant.weight === null) return;
      const sum = sums.get(t) || [0, 0];
      sum[0] += rate * tenant.weight;
      sum[1] += tenant.weight;
      sums.set(t, sum);
    }));
    const times = [...new Set(tenants.flatMap((tenant) => tenant.history.map((p) => p[0])))].sort((a, b) => a - b);
    const points = times.map((t) => {
      const sum = sums.get(t);
      return { t, v: sum && sum[1] > 0 ? sum[0] / sum[1] : null };
    });
    return [{ name: "fair rate", color: "#c9d1dc", points: smooth(points) }];
  }

  function drawChart(container, solid, dashed, opts) {
    const width = Math.max(container.clientWidth, 300);
    const height = Math.max(container.clientHeight, 150);
    const pad = { l: 52, r: 12, t: 10, b: 24 };
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label });
    const all = solid.concat(dashed).flatMap((s) => s.points);
    const ts = all.map((p) => p.t);
    if (!ts.length) {
      const text = svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" });
      text.textContent = "no history yet";
      root.append(text);
      container.replaceChildren(root);
      return;
    }
    const tMax = Math.max(...ts);
    // A young history fills the chart; an old one shows its last spanS seconds.
    const spanS = Math.min(opts.spanS, Math.max(60, tMax - Math.min(...ts)));
    const tMin = tMax - spanS;
    const values = all.filter((p) => p.v !== null && p.t >= tMin).map((p) => p.v);
    const yMax = opts.yMax !== undefined ? opts.yMax : niceCeil(Math.max(1e-9, ...values) * 1.08);
    const x = (t) => pad.l + ((t - tMin) / (tMax - tMin)) * (width - pad.l - pad.r);
    const y = (v) => pad.t + (1 - v / yMax) * (height - pad.t - pad.b);
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: i ? "grid-line" : "axis" }));
      const label = svg("text", { x: pad.l - 8, y: y(v) + 4, "text-anchor": "end", class: "tick" });
      label.textContent = opts.fmt(v);
      root.append(label);
    }
    for (let i = 0; i <= 5; i++) {
      const t = tMin + ((tMax - tMin) * i) / 5;
      const label = svg("text", { x: x(t), y: height - 6, "text-anchor": i === 0 ? "start" : i === 5 ? "end" : "middle", class: "tick" });
      const ago = Math.round(tMax - t);
      label.textContent = ago === 0 ? "now" : "−" + (ago >= 60 ? (ago / 60).toFixed(ago % 60 ? 1 : 0) + " min" : ago + " s");
      root.append(label);
    }
    const line = (series, cls) => series.forEach((s) => {
      let d = "";
      let pen = false;
      s.points.forEach((p) => {
        if (p.v === null || p.t < tMin) { pen = false; return; }
        d += (pen ? "L" : "M") + x(p.t).toFixed(1) + " " + y(Math.min(p.v, yMax)).toFixed(1) + " ";
        pen = true;
      });
      if (d) root.append(svg("path", { d, class: "series " + cls, stroke: s.color || colorOf(s.name), "data-series": s.name }));
    });
    line(dashed, "entitled");
    line(solid, "received");
    container.replaceChildren(root);
  }

  function niceCeil(v) {
    const base = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * base >= v) return m * base;
    return 10 * base;
  }

  function renderCharts(s) {
    const spanS = 300;
    drawChart(document.getElementById("chart-rate"), chartSeries(s.tenants, "rate"),
      fairRate(s.tenants), { spanS, fmt: (v) => fmtNum(v), label: "service rate per tenant" });
    drawChart(document.getElementById("chart-share"), chartSeries(s.tenants, "received"),
      chartSeries(s.tenants, "entitled"), { spanS, yMax: 1, fmt: fmtPct, label: "share of service per tenant" });
  }

  function lineKey(dashed) {
    const key = svg("svg", { width: 26, height: 8 });
    key.append(svg("line", { x1: 1, x2: 25, y1: 4, y2: 4, stroke: "#8b95a7", "stroke-width": 2,
      "stroke-dasharray": dashed ? "5 4" : "none" }));
    return key;
  }

  function renderLegend(s) {
    const root = document.getElementById("legend");
    const items = s.tenants.map((t) => {
      const item = el("span", { class: "legend-item", "data-tenant": t.name });
      item.append(el("span", { class: "swatch" }), t.name);
      item.firstChild.style.background = colorOf(t.name);
      return item;
    });
    const note = el("span", { class: "legend-note legend-key" });
    note.append(lineKey(false), " received", lineKey(true), " entitled / fair rate · 5 s means");
    root.replaceChildren(...items, note);
  }

  // ---- tables -------------------------------------------------------------------------------

  function headRow(table, names) {
    const head = el("thead");
    const row = el("tr");
    names.forEach(([name, cls]) => row.append(el("th", cls ? { class: cls } : {}, name)));
    head.append(row);
    return head;
  }

  function chips(prefix, values, fmt, classes) {
    const td = el("td");
    const box = el("span", { class: "chips" });
    const names = classes.filter((c) => c in values);
    if (!names.length && prefix !== "queue_depth") box.append(el("span", { class: "muted" }, "—"));
    names.forEach((name) => {
      const chip = el("span", { class: "chip" });
      chip.append(el("span", { class: "k" }, name), figure("span", prefix + "." + name, values[name], fmt(values[name])));
      box.append(chip);
    });
    td.append(box);
    return td;
  }

  function sparkline(tenant) {
    const w = 70, h = 18;
    const node = svg("svg", { width: w, height: h, class: "spark", "aria-hidden": "true" });
    const pts = tenant.history.slice(-60);
    if (pts.length > 1) {
      const max = Math.max(1e-9, ...pts.map((p) => p[1]));
      const d = pts.map((p, i) => (i ? "L" : "M") + ((i / (pts.length - 1)) * (w - 2) + 1).toFixed(1) + " " +
        (h - 2 - (p[1] / max) * (h - 4)).toFixed(1)).join(" ");
      node.append(svg("path", { d, fill: "none", stroke: colorOf(tenant.name), "stroke-width": 1.5 }));
    }
    return node;
  }

  function renderTenants(s) {
    const table = document.getElementById("tenants");
    const head = headRow(table, [["Tenant"], ["Weight"], ["Entitled"], ["Received"], ["Rate (units/s)"],
      ["Service units"], ["Fair counter"], ["Queued by class"], ["TTFT met"], ["TPOT met"], ["OK"],
      ["Rejected"], ["Preempted"]]);
    const body = el("tbody");
    s.tenants.forEach((t) => {
      const row = el("tr", { "data-tenant": t.name });
      const name = el("td");
      const label = el("span", { class: "name" });
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colorOf(t.name);
      label.append(swatch, el("span", {}, t.name));
      name.append(label);
      if (t.is_backlogged) name.append(el("span", { class: "badge backlogged", "data-field": "backlogged", "data-value": "1" }, "backlogged"));
      const rate = el("td");
      rate.append(sparkline(t), " ", figure("span", "service_rate", t.service_rate, fmtNum(t.service_rate)));
      const queued = chips("queue_depth", t.queue_by_class, fmtNum, s.slo_classes.concat(Object.keys(t.queue_by_class).filter((c) => !s.slo_classes.includes(c))));
      queued.prepend(figure("span", "queue_depth", t.queue_depth, fmtNum(t.queue_depth) + " ", "muted"));
      row.append(
        name,
        figure("td", "weight", t.weight, fmtNum(t.weight)),
        figure("td", "entitled_share", t.entitled_share, fmtPct(t.entitled_share)),
        figure("td", "service_share", t.service_share, fmtPct(t.service_share)),
        rate,
        figure("td", "service_units", t.service_units, fmtNum(t.service_units)),
        figure("td", "fair_counter", t.fair_counter, fmtNum(t.fair_counter)),
        queued,
        chips("ttft", t.ttft_attainment, fmtPct, s.slo_classes),
        chips("tpot", t.tpot_attainment, fmtPct, s.slo_classes),
        figure("td", "requests_ok", t.requests_ok, fmtNum(t.requests_ok)),
        figure("td", "rejections", t.rejections, fmtNum(t.rejections), t.rejections > 0 ? "warn" : ""),
        figure("td", "preemptions", t.preemptions, fmtNum(t.preemptions)),
      );
      const reasons = Object.entries(t.rejections_by_reason).map(([k, v]) => k + ": " + v).join(", ");
      if (reasons) row.lastChild.previousSibling.title = reasons;
      body.append(row);
    });
    if (!s.tenants.length) {
      const row = el("tr", { class: "empty-row" });
      row.append(el("td", { colspan: "13" }, "No tenant has sent a request yet."));
      body.append(row);
    }
    table.replaceChildren(head, body);
  }

  function workerName(id) {
    const td = el("td");
    td.append(el("span", { class: "name" }, id));
    return td;
  }

  function renderWorkers(s) {
    const table = document.getElementById("workers");
    const head = headRow(table, [["Worker"], ["Role", "text"], ["Model", "text"], ["State", "text"],
      ["Batch"], ["KV blocks used / total"], ["Prefix hit rate"]]);
    const body = el("tbody");
    s.workers.forEach((w) => {
      const row = el("tr", { "data-worker": w.worker, "data-role": w.role });
      const state = el("td", { class: "text" });
      state.append(figure("span", "state", w.state, w.state, "badge state-" + w.state.replace(/[^a-z_]/g, "")));
      const kv = el("td");
      const used = w.kv_blocks_total ? w.kv_blocks_used / w.kv_blocks_total : 0;
      const bar = el("span", { class: "bar" + (used > 0.9 ? " hot" : "") });
      const fill = el("span");
      fill.style.width = (used * 100).toFixed(1) + "%";
      bar.append(fill);
      kv.append(bar, figure("span", "kv_blocks_used", w.kv_blocks_used, fmtNum(w.kv_blocks_used)), " / ",
        figure("span", "kv_blocks_total", w.kv_blocks_total, fmtNum(w.kv_blocks_total)));
      row.append(
        workerName(w.worker),
        figure("td", "role", w.role, w.role, "text"),
        figure("td", "model", w.model, w.model, "text"),
        state,
        figure("td", "batch", w.batch, fmtNum(w.batch)),
        kv,
        figure("td", "prefix_hit_rate", w.prefix_hit_rate, fmtPct(w.prefix_hit_rate)),
      );
      body.append(row);
    });
    if (!s.workers.length) {
      const row = el("tr", { class: "empty-row" });
      row.append(el("td", { colspan: "7" }, "No worker known yet."));
      body.append(row);
    }
    table.replaceChildren(head, body);
  }

  // ---- live ---------------------------------------------------------------------------------

  function render(s) {
    s.tenants.forEach((t) => colorOf(t.name));
    renderCards(s);
    renderCharts(s);
    renderLegend(s);
    renderTenants(s);
    renderWorkers(s);
    const root = document.getElementById("dashboard");
    root.setAttribute("data-seq", String(s.seq));
    root.setAttribute("data-at", String(s.at));
    document.getElementById("updated").textContent = new Date(s.at * 1000).toLocaleTimeString("en-GB");
    lastUpdate = Date.now();
  }

  function setLive(state, text) {
    const node = document.getElementById("live");
    node.className = "live " + (state === "live" ? "live-on" : "live-wait");
    node.setAttribute("data-state", state);
    document.getElementById("live-text").textContent = text;
  }

  async function sessionGone() {
    try {
      const answer = await fetch("/dashboard/snapshot.json", { credentials: "same-origin", cache: "no-store" });
      return answer.status === 401;
    } catch (e) {
      return false; // the gateway is unreachable: keep trying
    }
  }

  function connect() {
    source = new EventSource("/dashboard/events");
    source.onopen = () => setLive("live", "live");
    source.onmessage = (event) => {
      setLive("live", "live");
      render(JSON.parse(event.data));
    };
    source.onerror = async () => {
      setLive("reconnecting", "reconnecting");
      if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      if (await sessionGone()) {
        window.location.reload(); // back to the login form
        return;
      }
      setTimeout(connect, 3000);
    };
  }

  document.addEventListener("DOMContentLoaded", () => {
    const initial = document.getElementById("initial-snapshot");
    if (initial) render(JSON.parse(initial.textContent));
    connect();
    setInterval(() => {
      if (lastUpdate && Date.now() - lastUpdate > STALE_MS) setLive("stale", "no update for " + Math.round((Date.now() - lastUpdate) / 1000) + " s");
    }, 1000);
  });
})();
