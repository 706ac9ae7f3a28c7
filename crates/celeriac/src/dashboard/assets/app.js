// The celeriac dashboard: views built from the JSON API with text nodes only (no markup is ever
// parsed from data), refreshed when the server-sent stream says the state changed.
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
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Celeriac-Token": tokenInput.value },
    body: JSON.stringify(body || {}),
  });
  const answer = await r.json().catch(() => ({}));
  lastNote = r.ok ? "done: " + JSON.stringify(answer) : "refused (" + r.status + "): " + (answer.error || "");
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
      el("td", {}, w.rss_kib ? Math.round(w.rss_kib / 1024) + " MiB" : ""),
      el("td", {}, w.recycles ? "tasks " + w.recycles.max_tasks + ", memory " + w.recycles.max_memory : ""),
      el("td", {}, text(w.hard_limit_kills)),
      el("td", {},
        el("button", { onclick: () => action("/api/workers/" + encodeURIComponent(w.hostname) + "/pool", { grow: 1 }, "Grow the pool of " + w.hostname + " by 1?") }, "+1"),
        el("button", { onclick: () => action("/api/workers/" + encodeURIComponent(w.hostname) + "/pool", { shrink: 1 }, "Shrink the pool of " + w.hostname + " by 1?") }, "-1"))));
    for (const c of w.children || []) {
      const task = c.task;
      rows.push(el("tr", { class: "child" + (c.blocked_on ? " blocked" : "") },
        el("td", {}, "  child " + c.slot),
        el("td", {}, "pid " + c.pid),
        el("td", {}, c.rss_kib ? Math.round(c.rss_kib / 1024) + " MiB" : ""),
        el("td", {}, "done " + c.tasks_done),
        el("td", { colspan: "3" }, task ? el("a", { href: "#/task/" + encodeURIComponent(task.id) }, task.name + " " + task.id) : "idle"),
        el("td", { colspan: "3", class: "blocked-on" }, c.blocked_on ? "blocked on: " + c.blocked_on : "")));
    }
    for (const t of w.active || []) {
      if ((w.children || []).length) continue;
      rows.push(el("tr", { class: "child" }, el("td", {}, "  running"), el("td", { colspan: "9" },
        el("a", { href: "#/task/" + encodeURIComponent(t.id) }, text(t.name) + " " + text(t.id)),
        " " + (t.runtime ? t.runtime.toFixed(1) + " s" : ""))));
    }
  }
  return [el("h2", {}, "Workers"), note(),
    table(["worker", "status", "heartbeat", "software, queues", "pool", "processed", "RSS", "recycles", "hard kills", "pool size"], rows)];
}

const filters = { state: "", name: "", worker: "" };

async function tasksView() {
  const q = new URLSearchParams({ ...filters, limit: "200" });
  const { body } = await getJson("/api/tasks?" + q);
  const rows = body.tasks.map((t) => el("tr", { class: "task" + (t.blocked_on ? " blocked" : ""), "data-id": t.id, title: t.blocked_on ? "blocked on: " + t.blocked_on : "" },
    el("td", {}, el("a", { href: "#/task/" + encodeURIComponent(t.id) }, t.id)),
    el("td", {}, text(t.name)), stateCell(t.state), el("td", {}, text(t.worker)),
    el("td", {}, el("pre", {}, text(t.args))), el("td", {}, el("pre", {}, t.blocked_on ? "blocked on: " + t.blocked_on : text(t.result || t.exception))),
    el("td", {}, time(t.received)), el("td", {}, t.runtime ? Number(t.runtime).toFixed(3) + " s" : "")));
  const input = (key, placeholder) => {
    const i = el("input", { placeholder: placeholder, value: filters[key] });
    i.addEventListener("change", () => { filters[key] = i.value; refresh(); });
    return i;
  };
  const search = el("input", { placeholder: "task id", id: "search" });
  search.addEventListener("change", () => { location.hash = "#/task/" + encodeURIComponent(search.value.trim()); });
  return [el("h2", {}, "Tasks (" + body.total + " kept)"),
    el("div", { class: "filters" }, input("state", "state (e.g. FAILURE)"), input("name", "name"), input("worker", "worker"), search),
    table(["id", "name", "state", "worker", "args", "result", "received", "runtime"], rows)];
}

async function taskView(id) {
  const { status, body: t } = await getJson("/api/tasks/" + encodeURIComponent(id));
  if (status === 404) return [el("h2", {}, "Task " + id), el("p", { id: "task-state", class: "state" }, "unknown")];
  const stored = t.stored || {};
  const link = (x) => el("a", { href: "#/task/" + encodeURIComponent(x) }, x);
  const rows = [
    ["state", el("span", { id: "task-state", class: "state state-" + t.state }, t.state)],
    ["name", text(t.name)], ["worker", text(t.worker)],
    ["args", el("pre", {}, text(t.args))], ["kwargs", el("pre", {}, text(t.kwargs))],
    ["result", el("pre", { id: "task-result" }, text(t.result !== undefined ? t.result : stored.result))],
    ["exception", el("pre", {}, text(t.exception))],
    ["traceback", el("pre", {}, text(t.traceback || stored.traceback))],
    ["blocked on", el("span", { id: "task-blocked" }, text(t.blocked_on))],
    ["hard limit in", t.hard_time_left ? Number(t.hard_time_left).toFixed(1) + " s" : ""],
    ["retries", text(t.retries)],
    ["received", time(t.received)], ["started", time(t.started)], ["finished", time(t.finished)],
    ["runtime", text(t.runtime)], ["eta", text(t.eta)], ["expires", text(t.expires)],
    ["parent", t.parent_id ? link(t.parent_id) : ""], ["root", t.root_id ? link(t.root_id) : ""],
    ["children", el("span", {}, ...(t.child_ids || []).map((c) => el("span", {}, link(c), " ")))],
    ["stored children", el("pre", {}, text(stored.children))],
  ].map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));
  const buttons = el("p", {},
    el("button", { id: "revoke", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/revoke", { terminate: false }, "Revoke " + id + "?") }, "Revoke"),
    el("button", { id: "terminate", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/revoke", { terminate: true }, "Terminate " + id + "?") }, "Terminate"),
    el("button", { id: "retry", onclick: () => action("/api/tasks/" + encodeURIComponent(id) + "/retry", {}, "Send " + id + " again with the same arguments?") }, "Retry"));
  return [el("h2", {}, "Task " + id), buttons, note(), table(["", ""], rows)];
}

async function queuesView() {
  const { body: queues } = await getJson("/api/queues");
  const rows = queues.map((q) => q.error ? el("tr", { class: "queue" }, el("td", {}, q.name), el("td", { colspan: "8", class: "error" }, q.error)) : el("tr", { class: "queue" },
    el("td", {}, q.name), el("td", {}, text(q.ready)), el("td", {}, known(q.scheduled)), el("td", {}, known(q.unacked)),
    el("td", {}, text(q.consumers)), el("td", {}, text(q.dead)), el("td", {}, known(q.rate_in)), el("td", {}, known(q.rate_out)),
    el("td", {}, el("button", { onclick: () => action("/api/queues/" + encodeURIComponent(q.name) + "/purge", {}, "Delete every ready message in " + q.name + "?") }, "Purge"))));
  const name = el("input", { placeholder: "task name" });
  const rate = el("input", { placeholder: "rate, e.g. 10/m" });
  const setRate = el("button", { onclick: () => action("/api/rate_limit", { task_name: name.value, rate_limit: rate.value }, "Set the rate limit of " + name.value + "?") }, "Set rate limit");
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
  status.textContent = o.connected ? "connected" : "disconnected";
  status.className = "status " + (o.connected ? "ok" : "down");
  status.title = o.error || "";
  document.getElementById("broker").textContent = o.broker;
  document.getElementById("mode").textContent = o.read_only ? "read-only" : "actions need the token";
  const chart = document.getElementById("chart");
  const max = Math.max(1, ...o.throughput.map((m) => m.succeeded + m.failed));
  chart.replaceChildren(...o.throughput.slice(-60).flatMap((m) => [
    el("div", { title: new Date(m.minute * 1000).toISOString() + " succeeded " + m.succeeded, style: "height:" + Math.round(40 * m.succeeded / max) + "px" }),
    el("div", { class: "failed", title: "failed " + m.failed, style: "height:" + Math.round(40 * m.failed / max) + "px" }),
  ]));
}

let busy = false, again = false, shownKey = "";
async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    const route = location.hash.replace(/^#\//, "") || "workers";
    for (const n of ["workers", "tasks", "queues"]) document.getElementById("nav-" + n).className = route.startsWith(n) ? "current" : "";
    let parts;
    fetched = [];
    if (route.startsWith("task/")) parts = await taskView(decodeURIComponent(route.slice(5)));
    else if (route === "tasks") parts = await tasksView();
    else if (route === "queues") parts = await queuesView();
    else parts = await workersView();
    const key = route + "\n" + lastNote + "\n" + fetched.join("\n");
    // Keep the focus in a filter field being typed in, and an unchanged view as it is.
    const typing = view.contains(document.activeElement) && document.activeElement.tagName === "INPUT";
    if (key !== shownKey && !typing) {
      view.replaceChildren(...parts);
      shownKey = key;
    }
    await header();
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = "disconnected";
    status.className = "status down";
  } finally {
    busy = false;
    if (again) { again = false; refresh(); }
  }
}

window.addEventListener("hashchange", () => { view.replaceChildren(); shownKey = ""; lastNote = ""; refresh(); });
const stream = new EventSource("/api/stream");
stream.addEventListener("update", refresh);
stream.onerror = () => { const s = document.getElementById("status"); s.textContent = "disconnected"; s.className = "status down"; };
setInterval(refresh, 5000);
refresh();
