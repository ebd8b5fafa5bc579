// arrival dashboard: polls /api/overview, computes rates from counter deltas, browses and
// replays dead letters. Hand-written, no framework. Every value shown goes through
// textContent (never innerHTML): queue names, bodies and errors are data, not markup.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "arrival-admin-token";
const CONFIRM_MS = 4000;

const state = {
  prev: null, // {t, counters: Map(key -> value)} of the previous poll
  queue: null, // the queue whose dead letters are shown
  dlqTotal: null, // its dead-letter count when they were last listed
  retry: null, // the action to repeat once a token is given
  confirmUntil: 0, // "Replay all" asks for a second click until then
};

// -- helpers --------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "data") Object.entries(v).forEach(([dk, dv]) => (node.dataset[dk] = dv));
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmtInt = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

function fmtRate(r) {
  if (r === null || r === undefined || !isFinite(r)) return "—";
  if (r === 0) return "0";
  return r >= 100 ? Math.round(r).toLocaleString("en-US") : r.toFixed(1);
}

function fmtAge(s) {
  if (!s) return "0 s";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "—";
}

// Make `old` look like `fresh`, changing only what differs: rows are not rebuilt at each
// poll, so a button being clicked, a selection or the focus survive a refresh. Clicks
// are handled by delegation (data-* attributes), so no listener refers to stale data.
function patch(old, fresh) {
  if (old.nodeType !== fresh.nodeType || old.nodeName !== fresh.nodeName) {
    old.replaceWith(fresh);
    return;
  }
  if (old.nodeType === Node.TEXT_NODE) {
    if (old.nodeValue !== fresh.nodeValue) old.nodeValue = fresh.nodeValue;
    return;
  }
  for (const a of [...old.attributes]) if (!fresh.hasAttribute(a.name)) old.removeAttribute(a.name);
  for (const a of [...fresh.attributes]) {
    if (old.getAttribute(a.name) !== a.value) old.setAttribute(a.name, a.value);
  }
  const oc = [...old.childNodes];
  const fc = [...fresh.childNodes];
  if (oc.length !== fc.length) {
    old.replaceChildren(...fc);
    return;
  }
  oc.forEach((c, i) => patch(c, fc[i]));
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token && opts.method === "POST") opts.headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, opts);
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = { error: `${res.status} ${res.statusText}` };
  }
  if (!res.ok) {
    const err = new Error((data && data.error) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// -- overview ---------------------------------------------------------------------------

function rate(counters, key, value, dt) {
  counters.set(key, value);
  if (!state.prev || dt <= 0) return null;
  const before = state.prev.counters.get(key);
  if (before === undefined || value < before) return null; // new, or the broker restarted
  return (value - before) / dt;
}

function renderBroker(b) {
  const facts = [
    ["version", b.version],
    ["backend", b.backend],
    ["epoch", fmtInt(b.epoch)],
    ["queues", fmtInt(b.queues)],
    ["connections", b.connections === null ? "embedded" : fmtInt(b.connections)],
    ["commits", fmtInt(b.commits)],
    ["fsyncs", fmtInt(b.fsyncs)],
  ];
  $("broker").replaceChildren(
    ...facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v })))
  );
}

function dlqCell(q) {
  if (!q.dead_letter) return el("span", { class: "muted", text: "—", title: "no dead-letter queue" });
  const n = q.dead_letters || 0;
  return el("button", {
    type: "button",
    class: `link${state.queue === q.name ? " selected" : ""}${n ? " warn" : ""}`,
    data: { action: "dlq", queue: q.name },
    title: `browse ${q.dead_letter}`,
    text: `${fmtInt(n)} ${n === 1 ? "letter" : "letters"}`,
  });
}

function renderQueues(data, counters, dt) {
  const table = $("queues");
  $("no-queues").hidden = data.queues.length > 0;
  const bodies = [];
  for (const q of data.queues) {
    const inRate = rate(counters, `${q.name}\u0000sent`, q.sent, dt);
    const groups = q.groups.length ? q.groups : [null];
    const span = groups.length;
    const body = el("tbody", { data: { queue: q.name } });
    groups.forEach((g, i) => {
      const row = el("tr", g ? { data: { group: g.group } } : {});
      if (i === 0) {
        const name = el("td", { class: "queue-name", rowspan: span }, q.name);
        if (q.dead_letter_of.length) {
          name.append(el("div", { class: "dlq-of", text: `dead letters of ${q.dead_letter_of.join(", ")}` }));
        }
        row.append(
          name,
          el("td", { rowspan: span }, el("span", { class: `badge ${q.guarantee}`, text: q.guarantee })),
          el("td", { class: "num", rowspan: span, text: fmtInt(q.stored) }),
          el("td", { class: "num", rowspan: span, text: fmtRate(inRate) })
        );
      }
      if (g) {
        const key = `${q.name}\u0000${g.group}`;
        const delivered = rate(counters, `${key}\u0000delivered`, g.delivered, dt);
        const acked = rate(counters, `${key}\u0000acked`, g.acked, dt);
        const internal = g.group.startsWith("~");
        row.append(
          el("td", { class: internal ? "muted" : null, text: internal ? "(dead-letter list)" : g.group }),
          el("td", { class: "num", text: fmtInt(g.consumers) }),
          el("td", { class: "num", text: fmtInt(g.backlog) }),
          el("td", { class: "num", text: fmtInt(g.in_flight) }),
          el("td", { class: "num", text: fmtAge(g.oldest_unacked_age) }),
          el("td", { class: "num", text: fmtRate(delivered) }),
          el("td", { class: "num", text: fmtRate(acked) })
        );
      } else {
        row.append(el("td", { class: "muted", colspan: 7, text: "no consumer group yet" }));
      }
      if (i === 0) row.append(el("td", { class: "num", rowspan: span }, dlqCell(q)));
      body.append(row);
    });
    bodies.push(body);
  }
  const old = [...table.tBodies];
  if (old.length !== bodies.length) {
    old.forEach((b) => b.remove());
    table.append(...bodies);
  } else {
    old.forEach((b, i) => patch(b, bodies[i]));
  }
}

async function poll() {
  try {
    await refresh();
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function refresh() {
  try {
    const data = await api("/api/overview");
    const now = performance.now();
    const dt = state.prev ? (now - state.prev.t) / 1000 : 0;
    const counters = new Map();
    renderBroker(data.broker);
    renderQueues(data, counters, dt);
    state.prev = { t: now, counters };
    const status = $("status");
    status.className = "status";
    status.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    if (state.queue) {
      const q = data.queues.find((x) => x.name === state.queue);
      if (q && q.dead_letters !== state.dlqTotal) await loadDlq();
    }
  } catch (e) {
    const status = $("status");
    status.className = "status down";
    status.textContent = `cannot reach the broker: ${e.message}`;
  }
}

// -- dead letters -------------------------------------------------------------------------

function showResult(ok, text) {
  const r = $("result");
  r.hidden = false;
  r.className = `result ${ok ? "ok" : "bad"}`;
  r.textContent = text;
}

async function openDlq(name) {
  state.queue = name;
  state.dlqTotal = null;
  $("result").hidden = true;
  $("token-form").hidden = true;
  $("dlq").hidden = false;
  $("dlq-title").textContent = `Dead letters of ${name}`;
  $("dlq-promise").textContent = "";
  document.querySelectorAll("button[data-action=dlq]").forEach((b) =>
    b.classList.toggle("selected", b.dataset.queue === name)
  );
  try {
    const d = await api(`/api/queues/${encodeURIComponent(name)}`);
    $("dlq-promise").textContent = `${d.guarantee}: ${d.promise}`;
  } catch (e) {
    $("dlq-promise").textContent = "";
  }
  await loadDlq();
}

async function loadDlq() {
  const name = state.queue;
  if (!name) return;
  const tbody = $("letters").querySelector("tbody");
  try {
    const data = await api(`/api/queues/${encodeURIComponent(name)}/dlq?limit=200`);
    if (state.queue !== name) return;
    state.dlqTotal = data.total;
    const shown = data.letters.length;
    const more = data.total > shown ? ` (showing the oldest ${shown})` : "";
    $("dlq-title").textContent = `Dead letters of ${name}: ${fmtInt(data.total)}${more}`;
    $("no-letters").hidden = shown > 0;
    $("replay-all").disabled = shown === 0;
    tbody.replaceChildren(...data.letters.map((d) => letterRow(name, d)));
  } catch (e) {
    showResult(false, `Could not list the dead letters of ${name}: ${e.message}`);
  }
}

function letterRow(queue, d) {
  const reason = d.quarantined ? `${d.reason || ""} (quarantined: replayed too often)` : d.reason;
  return el(
    "tr",
    { data: { letter: String(d.offset) } },
    el("td", { class: "num", text: d.offset }),
    el("td", { class: "ident", title: d.id, text: d.id === null ? "—" : d.id }),
    el("td", { class: "ident", title: d.key, text: d.key === null ? "—" : d.key }),
    el("td", { text: d.origin_group || "—" }),
    el("td", { class: "num", text: d.attempts }),
    el("td", { class: "error", text: reason || "—" }),
    el("td", { class: "error", text: d.last_error || "—" }),
    el("td", { text: fmtTime(d.last_failure) }),
    el("td", { class: "body", title: d.body, text: d.body }),
    el(
      "td",
      {},
      el("button", {
        type: "button",
        class: "replay",
        data: { offset: String(d.offset) },
        text: "Replay",
        title: `send it back to group ${d.origin_group || "?"} of ${queue}`,
      })
    )
  );
}

function describeReplay(queue, res) {
  const n = res.replayed;
  let text = `Replayed ${n} ${n === 1 ? "message" : "messages"} to ${queue}`;
  const groups = [...new Set(res.letters.map((d) => d.origin_group).filter(Boolean))];
  if (groups.length) text += ` (group ${groups.join(", ")})`;
  text += ".";
  if (res.held && res.held.length) {
    text += ` ${res.held.length} held back by the loop guard (replayed too often): purge or replay them with a higher max_replays.`;
  }
  return text;
}

async function replay(queue, selection, button) {
  const run = async () => {
    if (button) button.disabled = true;
    try {
      const res = await post(`/api/queues/${encodeURIComponent(queue)}/dlq/replay`, {
        ...selection,
        dry_run: false,
      });
      $("token-form").hidden = true;
      showResult(res.replayed > 0 || !(res.held && res.held.length), describeReplay(queue, res));
    } catch (e) {
      if (e.status === 401) {
        state.retry = run;
        $("token-form").hidden = false;
        $("token").focus();
      }
      showResult(false, `Replay failed: ${e.message}`);
    } finally {
      if (button) button.disabled = false;
      await loadDlq();
      await refresh();
    }
  };
  await run();
}

function replayAll() {
  const button = $("replay-all");
  if (Date.now() > state.confirmUntil) {
    state.confirmUntil = Date.now() + CONFIRM_MS;
    button.textContent = "Click again to replay all";
    setTimeout(() => {
      if (Date.now() >= state.confirmUntil) button.textContent = "Replay all";
    }, CONFIRM_MS);
    return;
  }
  state.confirmUntil = 0;
  button.textContent = "Replay all";
  replay(state.queue, { ids: null }, button);
}

// -- start ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("queues").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action=dlq]");
    if (b) openDlq(b.dataset.queue);
  });
  $("letters").addEventListener("click", (ev) => {
    const b = ev.target.closest("button.replay");
    if (b && state.queue) replay(state.queue, { offsets: [Number(b.dataset.offset)] }, b);
  });
  $("replay-all").addEventListener("click", replayAll);
  $("dlq-refresh").addEventListener("click", () => loadDlq());
  $("dlq-close").addEventListener("click", () => {
    state.queue = null;
    $("dlq").hidden = true;
    document.querySelectorAll("button[data-action=dlq]").forEach((b) => b.classList.remove("selected"));
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    $("token-form").hidden = true;
    const again = state.retry;
    state.retry = null;
    if (again) again();
  });
  poll();
});
