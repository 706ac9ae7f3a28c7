// The celeriac dashboard: views built from the JSON API with text nodes only (no markup is ever
// parsed from data), refreshed when the server-sent stream says the state changed (at most once a
// second: the server coalesces a busy worker's changes), or after 5 s without an update (ages).
// A refresh fetches the view shown and the header, nothing else; an update that comes during a
// refresh makes one more refresh, never more.
"use strict";

const view = document.getElementById("view");
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("celeriac-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("celeriac-token", tokenInput.value));

// el("td", {class: "x"}, "text", child...): an element whose text children are text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") e.addEventListener("click", v);
    // The page's Content-Security-Policy refuses style attributes; a style set through the
    // CSSOM is allowed.
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// A number the dashboard may not know (null in the JSON): "?" then.
function known(v) {
  return v === null || v === undefined ? "?" : text(v);
}

function text(v) {
  if (v === null || v === undefined) return "";
  return typeof v === "string" ? v : JSON.stringify(v);
}

// A stored result as a person reads it: an exception as Python prints it (`exc_type(args)`, the
// layout of Celery's `celery/backends/base.py` `prepare_exception`), a string as is.
function human(v) {
  if (v && typeof v === "object" && typeof v.exc_type === "string") {
    const args = Array.isArray(v.exc_message) ? v.exc_message : [v.exc_message];
    return v.exc_type + "(" + args.map((a) => typeof a === "string" ? "'" + a + "'" : text(a)).join(", ") + ")";
  }
  return text(v);
}

// What an action's answer says: each worker's reply, a new task's id, a purge's count.
function answerText(a) {
  if (a.replies) {
    const said = Object.entries(a.replies).map(([node, r]) => node + ": " + (r.ok || r.error || text(r)));
    if (a.pending) said.push(a.pending.join(", ") + " (running the task) has not replied yet");
    const late = " (the request stays valid for " + a.valid_for + " s for a busy worker)";
    return said.length ? said.join("; ") + (a.pending ? late : "") : "no worker replied yet" + late;
  }
  if (a.task_id) return "sent as task " + a.task_id;
  if (a.purged !== undefined) return "purged " + a.purged + " messages";
  if (a.recorded) return a.recorded;
  return text(a);
}

// A run time in seconds as a person reads it: 850 µs, 12.3 ms, 1.25 s, 3 min 5 s.
function duration(s) {
  if (typeof s !== "number" || !isFinite(s)) return "";
  if (s < 0.001) return Math.round(s * 1e6) + " µs";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

const SVG = "http://www.w3.org/2000/svg";
// svg("rect", {x: 1}, child...): an SVG element; text children are text nodes.
function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// "Nice" tick values from 0 to at least max: about 4 steps of 1, 2 or 5 times a power of ten.
// whole: counts, whose steps are whole numbers.
function ticks(max, whole) {
  if (!(max > 0)) max = 1;
  const raw = max / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
  if (whole) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = 0; v <= max + step * 0.999; v += step) out.push(v);
  return out;
}

function hhmm(t) {
  return new Date(t * 1000).toISOString().slice(11, 16);
}

// A chart with labelled axes. opts: {id, title, yLabel, xLabel, x0, x1 (Unix seconds), yFormat, whole,
// bars: [{x, width, stack: [{value, color, label}]}] or lines: [{label, color, points: [[x, y|null]]}]}.
function chart(opts) {
  const W = 560, H = 236, L = 64, R = 24, T = 40, B = 40;
  const pw = W - L - R, ph = H - T - B;
  const values = [];
  for (const b of opts.bars || []) values.push(b.stack.reduce((a, s) => a + s.value, 0));
  for (const l of opts.lines || []) for (const p of l.points) if (p[1] !== null) values.push(p[1]);
  const yt = ticks(Math.max(0, ...values), opts.whole);
  const ymax = yt[yt.length - 1];
  const xs = (x) => L + (pw * (x - opts.x0)) / Math.max(1, opts.x1 - opts.x0);
  const ys = (y) => T + ph - (ph * y) / ymax;
  const g = svg("svg", { class: "chart", id: opts.id, width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
  g.appendChild(svg("title", {}, opts.title));
  g.appendChild(svg("text", { x: L, y: 14, class: "chart-title" }, opts.title));
  for (const v of yt) {
    g.appendChild(svg("line", { x1: L, x2: L + pw, y1: ys(v), y2: ys(v), class: "grid" }));
    g.appendChild(svg("text", { x: L - 6, y: ys(v) + 4, "text-anchor": "end", class: "tick" }, opts.yFormat(v)));
  }
  const span = opts.x1 - opts.x0, every = span > 1800 ? 600 : span > 600 ? 300 : 60;
  for (let t = Math.ceil(opts.x0 / every) * every; t <= opts.x1; t += every) {
    g.appendChild(svg("line", { x1: xs(t), x2: xs(t), y1: T + ph, y2: T + ph + 4, class: "axis" }));
    g.appendChild(svg("text", { x: xs(t), y: T + ph + 16, "text-anchor": "middle", class: "tick" }, hhmm(t)));
  }
  g.appendChild(svg("line", { x1: L, x2: L + pw, y1: T + ph, y2: T + ph, class: "axis" }));
  g.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: T + ph, class: "axis" }));
  g.appendChild(svg("text", { x: L + pw / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, opts.xLabel));
  g.appendChild(svg("text", { x: 12, y: T + ph / 2, "text-anchor": "middle", class: "axis-label",
    transform: "rotate(-90 12 " + (T + ph / 2) + ")" }, opts.yLabel));
  for (const b of opts.bars || []) {
    let base = 0;
    for (const s of b.stack) {
      const h = (ph * s.value) / ymax;
      const rect = svg("rect", { x: xs(b.x) + 1, width: Math.max(1, (pw * b.width) / Math.max(1, span) - 2),
        y: ys(base) - h, height: h, fill: s.color, class: "bar" }, svg("title", {}, s.label));
      g.appendChild(rect);
      base += s.value;
    }
  }
  const legend = [];
  for (const l of opts.lines || []) {
    let d = "", pen = false;
    for (const [x, y] of l.points) {
      if (y === null) { pen = false; continue; }
      d += (pen ? "L" : "M") + xs(x).toFixed(1) + "," + ys(y).toFixed(1);
      pen = true;
    }
    if (d) g.appendChild(svg("path", { d: d, stroke: l.color, fill: "none", "stroke-width": 2, class: "series" }, svg("title", {}, l.label)));
    for (const [x, y] of l.points) if (y !== null) g.appendChild(svg("circle", { cx: xs(x), cy: ys(y), r: 2, fill: l.color }, svg("title", {}, l.label + " " + hhmm(x) + ": " + opts.yFormat(y))));
    legend.push([l.label, l.color]);
  }
  for (const b of (opts.bars || []).slice(0, 1)) for (const s of b.stack) legend.push([s.name, s.color]);
  let lx = L + pw;
  for (const [label, color] of legend.reverse()) {
    lx -= 8 + label.length * 7;
    g.appendChild(svg("rect", { x: lx - 12, y: 22, width: 10, height: 10, fill: color }));
    g.appendChild(svg("text", { x: lx, y: 31, class: "legend" }, label));
    lx -= 16;
  }
  return g;
}

function time(t) {
  return typeof t === "number" ? new Date(t * 1000).toISOString().slice(11, 23) : "";
}

function table(headers, rows) {
  return el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))), ...rows);
}

// The raw answers a view was built from; an unchanged view is not rebuilt, so a button is never
// replaced under the pointer.
let fetched = [];
async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  const raw = await r.text();
  fetched.push(path + " " + r.status + " " + raw);
  return { status: r.status, body: JSON.parse(raw) };
}

// What the last action answered, shown until the next one.
let lastNote = "";
function note() {
  return el("p", { id: "action-result", class: "muted" }, lastNote);
}

async function action(path, body, question) {
  if (question && !window.confirm(question)) return;
  // Each action's answer replaces the last one's: an earlier refusal never stays beside a success.
  lastNote = "sending…";
  const pending = document.getElementById("action-result");
  if (pending) pending.textContent = lastNote;
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Celeriac-Token": tokenInput.value },
    body: JSON.stringify(body || {}),
  });
  const answer = await r.json().catch(() => ({}));
  lastNote = r.ok ? "done: " + answerText(answer) : "refused (" + r.status + "): " + (answer.error || "");
  const shown = document.getElementById("action-result");
  if (shown) shown.textContent = lastNote;
  refresh();
}

function stateCell(state) {
  return el("td", { class: "state state-" + (state || "") }, state || "");
}

async function workersView() {
  const { body: workers } = await getJson("/api/workers");
  const rows = [];
  for (const w of workers) {
    rows.push(el("tr", { class: "worker", "data-hostname": w.hostname },
      el("td", {}, w.hostname),
      el("td", { class: w.online ? "online" : "offline" }, w.online ? "online" : "offline"),
      el("td", {}, w.heartbeat_age === null ? "" : w.heartbeat_age.toFixed(1) + " s"),
      el("td", {}, w.software + " " + text(w.version), el("br"), el("span", { class: "muted" }, (w.queues || []).join(", "))),
      el("td", {}, text(w.pool) + " x" + text(w.concurrency)),
      el("td", {}, text(w.processed)),
      el("td", {}, w.rss_kib ? Math.round(w.rss_kib / 1024) + " MiB"
        : w.peak_rss_kib ? "peak " + Math.round(w.peak_rss_kib / 1024) + " MiB" : el("span", { class: "muted" }, "not reported")),
      el("td", {}, w.recycles ? "tasks " + w.recycles.max_tasks + ", memory " + w.recycles.max_memory : el("span", { class: "muted" }, "not reported")),
      el("td", {}, w.hard_limit_kills === null || w.hard_limit_kills === undefined ? el("span", { class: "muted" }, "not reported") : text(w.hard_limit_kills)),
      el("td", {},
        el("button", { onclick: () => action("/api/workers/" + encodeURIComponent(w.hostname) + "/pool", { grow: 1 }, "Grow the pool of " + w.hostname + " by 1?") }, "+1"),
        el("button", { onclick: () => action("/api/workers/" + encodeURIComponent(w.hostname) + "/pool", { shrink: 1 }, "Shrink the pool of " + w.hostname + " by 1?") }, "-1"))));
    for (const c of w.children || []) {
      const task = c.task;
      rows.push(el("tr", { class: "child" + (c.blocked_on ? " blocked" : "") },
        el("td", {}, "  child " + c.slot),
        el("td", {}, "pid " + c.pid),
        el("td", {}, c.rss_kib ? Math.round(c.rss_kib / 1024) + " MiB" : el("span", { class: "muted" }, "RSS not reported")),
        el("td", {}, c.tasks_done === null || c.tasks_done === undefined ? el("span", { class: "muted" }, "done: not reported") : "done " + c.tasks_done),
        el("td", { colspan: "3" }, task ? el("a", { href: "#/task/" + encodeURIComponent(task.id) }, text(task.name) + " " + task.id) : "idle"),
        el("td", { colspan: "3", class: "blocked-on" }, c.blocked_on ? "blocked on: " + c.blocked_on : "")));
    }
    for (const t of w.active || []) {
      if ((w.children || []).length) continue;
      rows.push(el("tr", { class: "child" }, el("td", {}, "  running"), el("td", { colspan: "9" },
        el("a", { href: "#/task/" + encodeURIComponent(t.id) }, text(t.name) + " " + text(t.id)),
        " " + (t.runtime ? t.runtime.toFixed(1) + " s" : ""))));
    }
  }
  // On SQLite: what the file cannot tell, and the consumers holding its messages.
  const { body: file } = await getJson("/api/file");
  const fromFile = file.note ? [el("p", { id: "file-note", class: "muted" }, file.note),
    table(["consumer (from the SQLite file)", "messages held", "queues"], file.consumers.map((c) =>
      el("tr", { class: "consumer" }, el("td", {}, c.consumer), el("td", {}, text(c.holding)), el("td", {}, c.queues.join(", ")))))] : [];
  return [el("h2", {}, "Workers"), note(), ...fromFile,
    table(["worker", "status", "heartbeat", "software, queues", "pool", "processed", "RSS", "recycles", "hard kills", "pool size"], rows)];
}

const filters = { state: "", name: "", worker: "", id: "" };
// The list is paged, 200 tasks a page, through all the tasks kept.
const PAGE = 200;
let listOffset = 0;
let filterTimer = null;

async function tasksView() {
  const q = new URLSearchParams({ ...filters, offset: String(listOffset), limit: String(PAGE) });
  const { status, body } = await getJson("/api/tasks?" + q);
  // A filter the server refuses (an unknown state) shows why, not the previous results.
  const refused = status !== 200 ? el("p", { id: "filter-error", class: "error" }, "refused (" + status + "): " + text(body.error)) : null;
  if (refused) { body.tasks = []; body.matched = 0; }
  const rows = body.tasks.map((t) => el("tr", { class: "task" + (t.hung ? " hung" : ""), "data-id": t.id, title: t.hung ? "hung: " + t.hung : "" },
    el("td", {}, el("a", { href: "#/task/" + encodeURIComponent(t.id) }, t.id)),
    el("td", {}, text(t.name) || "—"), stateCell(t.state), el("td", {}, text(t.worker)),
    el("td", {}, el("pre", {}, text(t.args))),
    el("td", {}, el("pre", {}, t.hung ? "hung: " + t.hung : text(t.result || t.exception))),
    el("td", {}, time(t.received)), el("td", { class: "runtime" }, duration(t.runtime))));
  // Filters apply as they are typed (after a pause of 300 ms), not when the field is left.
  const input = (key, placeholder) => {
    const i = el("input", { placeholder: placeholder, value: filters[key], id: "filter-" + key });
    i.addEventListener("input", () => {
      clearTimeout(filterTimer);
      filterTimer = setTimeout(() => { filters[key] = i.value.trim(); listOffset = 0; refresh(); }, 300);
    });
    // Enter opens the task the prefix names when exactly one matches; else the list is filtered.
    if (key === "id") i.addEventListener("keydown", async (e) => {
      const prefix = i.value.trim();
      if (e.key !== "Enter" || !prefix) return;
      clearTimeout(filterTimer);
      const r = await fetch("/api/tasks?" + new URLSearchParams({ ...filters, id: prefix, limit: "2" }), { cache: "no-store" });
      const found = r.ok ? await r.json() : { tasks: [] };
      if (found.tasks.length === 1 && found.matched === 1) location.hash = "#/task/" + encodeURIComponent(found.tasks[0].id);
      else { filters.id = prefix; listOffset = 0; refresh(); }
    });
    return i;
  };
  const turn = (id, label, offset) => el("button", { id: id, onclick: () => { listOffset = Math.max(0, offset); refresh(); } }, label);
  const pages = el("p", { class: "pages" },
    listOffset > 0 ? turn("page-newer", "← newer " + PAGE, listOffset - PAGE) : null,
    listOffset + body.tasks.length < body.matched ? turn("page-older", "older " + PAGE + " →", listOffset + PAGE) : null);
  const shown = body.tasks.length ? (listOffset + 1) + "–" + (listOffset + body.tasks.length) : "0";
  const { body: file } = await getJson("/api/file");
  return [el("h2", {}, "Tasks"), file.note ? el("p", { id: "file-note", class: "muted" }, file.note) : null,
    el("div", { class: "filters" }, input("state", "state (e.g. FAILURE)"), input("name", "name contains"),
      input("worker", "worker contains"), input("id", "id starts with (Enter opens)")),
    refused, el("p", { id: "task-count", class: "muted" }, "showing " + shown + " of " + body.matched + " matching, " + body.total + " kept"),
    table(["id", "name", "state", "worker", "args", "result", "received", "run time"], rows), pages];
}

const STATE_COLOURS = { SUCCESS: "#2e7d32", FAILURE: "#c62828", REVOKED: "#c62828", REJECTED: "#c62828",
  STARTED: "#1565c0", RETRY: "#ef6c00", RECEIVED: "#6a7489", PENDING: "#9aa3b5" };

// The workflow as a graph: tasks in columns by depth from the root (left to right), edges
// parent -> child (solid), chain (blue), chord (to the body, dashed), link/errback (dotted);
// a group is a box around its members, labelled with its chord's body when it is a header.
function workflowGraph(g, current) {
  const nodes = g.nodes || [], edges = g.edges || [];
  const depth = {};
  for (const n of nodes) depth[n.id] = 0;
  // Longest path from a source; at most as many rounds as nodes (a cycle cannot loop forever).
  for (let round = 0; round < nodes.length; round++) {
    let moved = false;
    for (const e of edges) {
      if (depth[e.from] === undefined || depth[e.to] === undefined) continue;
      if (depth[e.to] < depth[e.from] + 1) { depth[e.to] = depth[e.from] + 1; moved = true; }
    }
    if (!moved) break;
  }
  const columns = [];
  for (const n of nodes) (columns[depth[n.id]] = columns[depth[n.id]] || []).push(n);
  const NW = 170, NH = 40, GX = 70, GY = 22, PAD = 14;
  const pos = {};
  columns.forEach((col, c) => {
    col.sort((a, b) => String(a.group || "").localeCompare(String(b.group || "")));
    col.forEach((n, r) => { pos[n.id] = { x: PAD + 4 + c * (NW + GX), y: PAD + 18 + r * (NH + GY) }; });
  });
  const W = PAD * 2 + 8 + Math.max(1, columns.length) * (NW + GX) - GX;
  const H = PAD * 2 + 26 + Math.max(1, ...columns.map((c) => c.length)) * (NH + GY);
  const out = svg("svg", { id: "workflow-graph", class: "graph", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
  out.appendChild(svg("title", {}, "workflow of " + current));
  const defs = svg("defs", {});
  for (const [kind, colour] of [["parent", "#6a7489"], ["chain", "#1565c0"], ["chord", "#8e24aa"], ["link", "#2e7d32"], ["errback", "#c62828"]]) {
    defs.appendChild(svg("marker", { id: "arrow-" + kind, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", fill: colour })));
  }
  out.appendChild(defs);
  for (const grp of g.groups || []) {
    const ps = grp.members.map((m) => pos[m]).filter(Boolean);
    if (!ps.length) continue;
    const x0 = Math.min(...ps.map((p) => p.x)) - 8, y0 = Math.min(...ps.map((p) => p.y)) - 16;
    const x1 = Math.max(...ps.map((p) => p.x)) + NW + 8, y1 = Math.max(...ps.map((p) => p.y)) + NH + 6;
    const label = (grp.chord ? "chord header → " + text(grp.chord.name) : "group") + " " + grp.id.slice(0, 8);
    out.appendChild(svg("g", { class: "group-box", "data-group": grp.id },
      svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 6 }),
      svg("text", { x: x0 + 6, y: y0 + 12, class: "group-label" }, label)));
  }
  for (const e of edges) {
    const a = pos[e.from], b = pos[e.to];
    if (!a || !b) continue;
    const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x, y2 = b.y + NH / 2, mx = (x1 + x2) / 2;
    out.appendChild(svg("path", { d: "M" + x1 + "," + y1 + " C" + mx + "," + y1 + " " + mx + "," + y2 + " " + x2 + "," + y2,
      class: "edge edge-" + e.kind, "data-from": e.from, "data-to": e.to, "marker-end": "url(#arrow-" + e.kind + ")" },
      svg("title", {}, e.kind + ": " + e.from + " → " + e.to)));
  }
  for (const n of nodes) {
    const p = pos[n.id];
    const a = svg("a", { href: "#/task/" + encodeURIComponent(n.id) });
    a.appendChild(svg("rect", { x: p.x, y: p.y, width: NW, height: NH, rx: 4, fill: STATE_COLOURS[n.state] || "#9aa3b5",
      class: "node" + (n.id === current ? " current" : "") }));
    const name = text(n.name) || "?";
    a.appendChild(svg("text", { x: p.x + 8, y: p.y + 16, class: "node-name" }, name.length > 22 ? name.slice(0, 21) + "…" : name));
    a.appendChild(svg("text", { x: p.x + 8, y: p.y + 32, class: "node-id" }, n.id.slice(0, 8) + " " + text(n.state)));
    out.appendChild(svg("g", { class: "node-box", "data-id": n.id, "data-state": text(n.state) }, svg("title", {}, name + " " + n.id + " " + text(n.state)), a));
  }
  return out;
}

async function taskView(id) {
  const { status, body: t } = await getJson("/api/tasks/" + encodeURIComponent(id));
  if (status === 404) {
    // A group's id: its members when the dashboard keeps any, else say what the id may be.
    const members = t.group_members || [];
    return [el("h2", {}, "Task " + id), el("p", { id: "task-state", class: "state" }, "unknown"),
      members.length
        ? el("div", { id: "group-members" }, el("p", {}, "This is the id of a group; its members:"),
          table(["id", "name", "state"], members.map((m) => el("tr", {}, el("td", {}, el("a", { href: "#/task/" + encodeURIComponent(m.id) }, m.id)),
            el("td", {}, m.name || "—"), stateCell(m.state)))))
        : el("p", { id: "group-members", class: "muted" }, "No task with this id is kept, nor any task of a group with this id.")];
  }
  const stored = t.stored || {};
  const link = (x) => el("a", { href: "#/task/" + encodeURIComponent(x) }, x);
  const refs = (list) => el("span", {}, ...(list || []).map((r) => el("span", {}, link(r.id), " (" + text(r.name) + ") ")));
  const final = ["SUCCESS", "FAILURE", "REVOKED", "REJECTED"].includes(t.state);
  const rows = [
    ["state", el("span", { id: "task-state", class: "state state-" + t.state }, t.state)],
    ["name", el("span", { id: "task-name" }, text(t.name || stored.name) || "—")], ["worker", text(t.worker)],
    ["args", el("pre", {}, text(t.args))], ["kwargs", el("pre", {}, text(t.kwargs))],
    ["result", el("pre", { id: "task-result" }, t.result !== undefined ? text(t.result) : human(stored.result))],
    ["exception", el("pre", {}, text(t.exception))],
    ["traceback", el("pre", {}, text(t.traceback || (t.state === "FAILURE" ? stored.traceback : "")))],
    t.retry_traceback || t.retry_exception ? ["traceback of retry " + text(t.retry_number),
      el("pre", { id: "retry-traceback" }, text(t.retry_exception) + "\n" + text(t.retry_traceback))] : null,
    ["hung", el("span", { id: "task-hung", class: t.hung ? "error" : "" }, text(t.hung))],
    ["blocked on", el("span", { id: "task-blocked" }, text(t.blocked_on))],
    ["hard limit in", typeof t.hard_time_left === "number" ? duration(t.hard_time_left) : ""],
    ["retries", text(t.retries)],
    ["received", time(t.received)], ["started", time(t.started)], ["finished", final ? time(t.finished) : ""],
    ["run time", duration(t.runtime)], ["eta", text(t.eta)], ["expires", text(t.expires)],
    ["parent", t.parent_id ? link(t.parent_id) : ""], ["root", t.root_id ? link(t.root_id) : ""],
    ["children", el("span", { id: "task-children" }, ...(t.child_ids || []).map((c) => el("span", {}, link(c), " ")))],
    ["group", t.group ? el("span", { id: "task-group" }, t.group + (t.group_index !== undefined ? " (member " + t.group_index + ")" : "")) : ""],
    ["chord body", t.chord ? el("span", { id: "task-chord" }, link(t.chord.id), " (" + text(t.chord.name) + ")") : ""],
    ["next in chain", t.chain ? el("span", { id: "task-chain" }, refs(t.chain)) : ""],
    ["link / errback", t.link || t.errback ? el("span", {}, refs(t.link), t.errback ? el("span", {}, "on error: ", refs(t.errback)) : null) : ""],
  ].filter((r) => r && (["state", "name", "worker", "args", "kwargs", "result"].includes(r[0])
      || !(r[1] === "" || (r[1] instanceof Node && r[1].textContent.trim() === ""))))
    .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));
  const buttons = el("p", {},
    el("button", { id: "revoke", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/revoke", { terminate: false }, "Revoke " + id + "?") }, "Revoke"),
    el("button", { id: "terminate", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/revoke", { terminate: true }, "Terminate " + id + "?") }, "Terminate"),
    el("button", { id: "retry", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/retry", {}, "Send " + id + " again with the same arguments?") }, "Retry"));
  const graph = t.graph && t.graph.nodes && t.graph.nodes.length > 1
    ? [el("h3", {}, "Workflow"), el("div", { class: "graph-box" }, workflowGraph(t.graph, id)),
      el("p", { class: "muted" }, "columns by depth from the root; grey: parent → child, blue: chain, purple: chord header → body, green/red: link/errback; boxes: groups")]
    : [];
  return [el("h2", {}, "Task " + id), buttons, note(), ...graph, table(["", ""], rows)];
}

async function chartsView() {
  const { body: c } = await getJson("/api/charts");
  const minutes = c.minutes;
  const x0 = minutes[0].minute, x1 = minutes[minutes.length - 1].minute + 60;
  const out = [el("h2", {}, "Charts")];
  out.push(chart({ id: "chart-throughput", title: "Tasks finished per minute", yLabel: "tasks / min", xLabel: "time (UTC), last hour",
    x0, x1, yFormat: (v) => String(Math.round(v)), whole: true,
    bars: minutes.map((m) => ({ x: m.minute, width: 60, stack: [
      { name: "succeeded", value: m.succeeded, color: "#2e7d32", label: hhmm(m.minute) + " succeeded " + m.succeeded },
      { name: "failed", value: m.failed, color: "#c62828", label: hhmm(m.minute) + " failed " + m.failed }] })) }));
  out.push(chart({ id: "chart-runtime", title: "Run time percentiles per minute", yLabel: "run time", xLabel: "time (UTC), last hour",
    x0, x1, yFormat: duration,
    lines: [["p50", "#1565c0"], ["p95", "#ef6c00"], ["p99", "#c62828"]].map(([p, color]) => ({ label: p, color,
      points: minutes.map((m) => [m.minute + 30, m.runtime[p]]) })) }));
  // The same hour as the other charts.
  for (const [queue, samples] of Object.entries(c.depths)) {
    out.push(chart({ id: "chart-depth-" + queue, title: "Queue " + queue + ": depth at each poll (every " + c.poll_seconds + " s)",
      yLabel: "messages", xLabel: "time (UTC), last hour", x0, x1, yFormat: (v) => String(Math.round(v)), whole: true,
      lines: [["ready", 1, "#1565c0"], ["unacked", 2, "#ef6c00"], ["scheduled", 3, "#8e24aa"]].map(([label, i, color]) => ({ label, color,
        points: samples.map((s) => [s[0], s[i]]) })) }));
  }
  const rows = c.runtimes.map((r) => el("tr", { class: "runtime-row" }, el("td", {}, r.name), el("td", {}, String(r.count)),
    el("td", {}, duration(r.p50)), el("td", {}, duration(r.p95)), el("td", {}, duration(r.p99))));
  out.push(el("h3", {}, "Run time by task name (since the dashboard started)"),
    table(["task", "runs", "p50", "p95", "p99"], rows));
  return out;
}

async function queuesView() {
  const { body: queues } = await getJson("/api/queues");
  const rows = queues.map((q) => q.error ? el("tr", { class: "queue" }, el("td", {}, q.name), el("td", { colspan: "8", class: "error" }, q.error)) : el("tr", { class: "queue" },
    el("td", {}, q.name), el("td", {}, text(q.ready)), el("td", {}, known(q.scheduled)), el("td", {}, known(q.unacked)),
    el("td", {}, known(q.consumers)), el("td", {}, known(q.dead)), el("td", {}, known(q.rate_in)), el("td", {}, known(q.rate_out)),
    el("td", {}, el("button", { onclick: () => action("/api/queues/" + encodeURIComponent(q.name) + "/purge", {}, "Delete every ready message in " + q.name + "?") }, "Purge"))));
  const name = el("input", { placeholder: "task name", id: "rate-task" });
  const rate = el("input", { placeholder: "rate, e.g. 10/m", id: "rate-value" });
  const setRate = el("button", { id: "set-rate", onclick: () => action("/api/rate_limit", { task_name: name.value, rate_limit: rate.value }, "Set the rate limit of " + name.value + "?") }, "Set rate limit");
  const { body: dl } = await getJson("/api/dead_letters");
  const deadRows = dl.dead_letters.map((d) => el("tr", { class: "dead-letter" },
    el("td", {}, text(d.queue)),
    el("td", {}, d.task_id ? el("a", { href: "#/task/" + encodeURIComponent(d.task_id) }, d.task_id) : ""),
    el("td", {}, el("pre", {}, text(d.reason)))));
  return [el("h2", {}, "Queues"), note(),
    table(["queue", "ready", "scheduled", "unacked", "consumers", "dead", "in /s", "out /s", ""], rows),
    el("h3", {}, "Dead letters"),
    dl.unsupported ? el("p", { class: "muted" }, dl.unsupported) : table(["queue", "task", "reason"], deadRows),
    el("h3", {}, "Rate limit"), el("div", { class: "filters" }, name, rate, setRate)];
}

async function header() {
  const { body: o } = await getJson("/api/overview");
  const status = document.getElementById("status");
  // The reason is shown as text, not only as a tooltip.
  status.textContent = o.connected ? "connected" : "disconnected" + (o.error ? ": " + o.error : "");
  status.className = "status " + (o.connected ? "ok" : "down");
  status.title = o.error || "";
  document.getElementById("broker").textContent = o.broker;
  document.getElementById("mode").textContent = o.read_only ? "read-only" : "actions need the token";
}

// QUIET: a view is refreshed this long after its last refresh even without an update (a
// worker's heartbeat age, a worker gone quiet).
const QUIET = 5000;
let busy = false, again = false, shownKey = "", quietTimer = null;
async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  clearTimeout(quietTimer);
  try {
    const route = location.hash.replace(/^#\//, "") || "workers";
    for (const n of ["workers", "tasks", "queues", "charts"]) document.getElementById("nav-" + n).className = route.startsWith(n) ? "current" : "";
    let parts;
    fetched = [];
    if (route.startsWith("task/")) parts = await taskView(decodeURIComponent(route.slice(5)));
    else if (route === "tasks") parts = await tasksView();
    else if (route === "queues") parts = await queuesView();
    else if (route === "charts") parts = await chartsView();
    else parts = await workersView();
    const key = route + "\n" + lastNote + "\n" + fetched.join("\n");
    // An unchanged view stays as it is. A field being typed in keeps its focus, text and caret
    // (a filter field, which has an id, is rebuilt with it; an unnamed one holds the view).
    const focused = view.contains(document.activeElement) && document.activeElement.tagName === "INPUT" ? document.activeElement : null;
    if (key !== shownKey && (!focused || focused.id)) {
      view.replaceChildren(...parts.filter((p) => p !== null && p !== undefined));
      shownKey = key;
      const same = focused && document.getElementById(focused.id);
      if (same && same !== focused) {
        same.value = focused.value;
        same.focus();
        try { same.setSelectionRange(focused.selectionStart, focused.selectionEnd); } catch (e) { /* not a text field */ }
      }
    }
    await header();
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = "disconnected";
    status.className = "status down";
  } finally {
    busy = false;
    if (again) { again = false; refresh(); }
    else quietTimer = setTimeout(refresh, QUIET);
  }
}

// Another page: the task list opens at its first page again (its filters are kept).
window.addEventListener("hashchange", () => { view.replaceChildren(); shownKey = ""; lastNote = ""; listOffset = 0; refresh(); });
const stream = new EventSource("/api/stream");
stream.addEventListener("update", refresh);
stream.onerror = () => { const s = document.getElementById("status"); s.textContent = "disconnected"; s.className = "status down"; };
refresh();
