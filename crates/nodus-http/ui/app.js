// nodus dashboard: renders the node's snapshot and follows the live feed (/api/events,
// server-sent events: "snapshot" with the whole state, "notice" when something changed).
// Plain JavaScript, no build step; every value from the node is inserted as text, never HTML.
"use strict";

const THROUGHPUT_POINTS = 60;
const LOG_LINES = 50;
const throughput = []; // {t: ms, rate: completed/s}
let lastCompleted = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function setBadge(id, text, kind) {
  const b = document.getElementById(id);
  b.textContent = text;
  b.className = "badge" + (kind ? " " + kind : "");
}

function fillTable(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}

function duration(secs) {
  const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24, m = Math.floor(secs / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${secs % 60}s`;
}

function renderNode(s) {
  document.getElementById("node-name").textContent = s.node.name || "(unnamed)";
  document.title = "nodus · " + (s.node.name || "");
  const meta = [s.node.version && "v" + s.node.version, s.node.state, "up " + duration(s.node.uptime_secs || 0)];
  document.getElementById("node-meta").textContent = meta.filter(Boolean).join(" · ");
}

function renderCluster(c) {
  const q = c.quorum;
  setBadge("quorum", `quorum ${q.up ? "up" : "down"} ${q.live}/${q.known} (need ${q.needed})`, q.up ? (q.complete ? "ok" : "warn") : "bad");
  const offset = c.clock.max_offset_ms == null ? "" : ` ±${c.clock.max_offset_ms.toFixed(1)} ms`;
  setBadge("clock", `clock ${c.clock.stable ? "stable" : "unstable"}${offset}`, c.clock.stable ? "ok" : "warn");

  const map = document.getElementById("map");
  const n = c.nodes.length, cx = 200, cy = 125, r = n > 1 ? 90 : 0;
  const pos = {};
  c.nodes.forEach((node, i) => {
    const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    pos[node.name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const links = c.links.filter((l) => pos[l.from] && pos[l.to]).map((l) => {
    const [x1, y1] = pos[l.from], [x2, y2] = pos[l.to];
    const line = svg("line", { x1, y1, x2, y2, class: "link" + (l.up ? "" : " down") });
    line.append(svg("title", {}, `${l.from} — ${l.to}: ${l.up ? "up" : "down"}${l.rtt_ms == null ? "" : ", " + l.rtt_ms.toFixed(2) + " ms"}`));
    return line;
  });
  const nodes = c.nodes.map((node) => {
    const [x, y] = pos[node.name];
    const g = svg("g", { class: "node" + (node.live ? "" : " down") + (node.is_self ? " self" : ""), "data-node": node.name });
    g.append(svg("circle", { cx: x, cy: y, r: 14 }), svg("text", { x, y: y + 30 }, node.name));
    g.append(svg("title", {}, `${node.name} ${node.address} ${node.live ? "live" : "down"}`));
    return g;
  });
  map.replaceChildren(...links, ...nodes);

  fillTable("nodes", c.nodes.map((node) => el("tr", { "data-node": node.name },
    el("td", {}, node.name + (node.is_self ? " (this node)" : "")),
    el("td", {}, node.address || "—"),
    el("td", { class: node.live ? "live" : "down" }, node.live ? "live" : "down"))));
}

function renderApps(apps) {
  const box = document.getElementById("apps");
  if (!apps.length) {
    box.replaceChildren(el("p", { class: "empty" }, "no apps deployed"));
    return;
  }
  box.replaceChildren(...apps.map((a) => {
    const workers = el("div", { class: "workers" }, ...a.workers.map((w) => {
      const cell = el("span", { class: "worker " + w.state, title: `${w.uuid} pid ${w.pid} ${w.state}, load ${w.load}` }, w.load);
      return cell;
    }));
    const statusKind = a.status === "running" ? "ok" : a.status === "failed" ? "bad" : "";
    return el("div", { class: "card", "data-app": a.name },
      el("h3", {}, a.name, " ", el("span", { class: "badge " + statusKind }, a.status)),
      el("div", { class: "meta" }, `node ${a.node || "?"} · v${a.version} · ${a.workers.length} workers (keep ${a.population}) · queued ${a.queued} · sessions ${a.sessions}`),
      workers);
  }));
}

function renderTasks(t, takenAt) {
  const panel = document.getElementById("tasks-panel");
  panel.dataset.absent = String(!t);
  if (!t) {
    document.getElementById("task-counts").replaceChildren(el("span", { class: "empty" }, "this node does not run tasks"));
    fillTable("recent-tasks", []);
    return;
  }
  fillTable("recent-tasks", (t.recent || []).map((r) => el("tr", { "data-task": r.id, "data-status": r.status },
    el("td", {}, r.id), el("td", {}, r.procedure), el("td", {}, r.status), el("td", {}, r.attempt))));
  document.getElementById("task-totals").textContent =
    `since start: ${t.submitted_total || 0} submitted · ${t.done_total || 0} done · ${t.failed_total || 0} failed`;
  const counts = Object.entries(t.by_status || {});
  const box = document.getElementById("task-counts");
  box.replaceChildren(...(counts.length ? counts.map(([status, n]) =>
    el("div", { class: "count", "data-status": status }, el("b", {}, n), status)) : [el("span", { class: "empty" }, "no tasks")]));

  if (lastCompleted && takenAt > lastCompleted.t) {
    const rate = Math.max(0, (t.completed_total - lastCompleted.n) * 1000 / (takenAt - lastCompleted.t));
    throughput.push({ t: takenAt, rate });
    if (throughput.length > THROUGHPUT_POINTS) throughput.shift();
  }
  lastCompleted = { t: takenAt, n: t.completed_total };
  const peak = Math.max(0, ...throughput.map((p) => p.rate));
  const max = Math.max(1, peak);
  const points = throughput.map((p, i) => `${(i * 300) / (THROUGHPUT_POINTS - 1)},${78 - (p.rate / max) * 74}`).join(" ");
  document.getElementById("throughput").replaceChildren(svg("polyline", { points }));
  const now = throughput.length ? throughput[throughput.length - 1].rate : 0;
  document.getElementById("throughput-label").textContent = `completed/s: ${now.toFixed(1)} now, ${peak.toFixed(1)} peak · ${t.completed_total} total`;
}

function render(s) {
  renderNode(s);
  renderCluster(s.cluster);
  renderApps(s.apps);
  renderTasks(s.tasks, s.taken_at_ms);
  fillTable("services", s.services.map((v) => el("tr", { "data-service": v.name },
    el("td", {}, v.name), el("td", {}, v.node), el("td", {}, v.kind), el("td", {}, v.instances))));
  document.getElementById("flags-panel").dataset.absent = String(!s.flags);
  fillTable("flags", (s.flags || []).map((f) => el("tr", { "data-flag": f.name },
    el("td", {}, f.name), el("td", {}, f.source), el("td", {}, f.priority), el("td", {}, f.message))));
  document.body.dataset.updated = String(s.taken_at_ms);
}

function log(notice) {
  const list = document.getElementById("log");
  const when = new Date().toLocaleTimeString();
  list.prepend(el("li", { "data-kind": notice.kind }, el("span", { class: "when" }, when), notice.text));
  while (list.children.length > LOG_LINES) list.lastChild.remove();
}

function follow() {
  const feed = new EventSource("/api/events");
  feed.addEventListener("open", () => setBadge("feed", "live", "ok"));
  feed.addEventListener("error", () => setBadge("feed", "reconnecting", "warn"));
  feed.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
  feed.addEventListener("notice", (e) => log(JSON.parse(e.data)));
}

follow();
