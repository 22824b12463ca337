// The ops page: what `tokenrelay status --json` shows (the same endpoint data), refreshed live.
"use strict";

const KEY_STORE = "tokenrelay.api-key";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
let timer = null;

function table(id, header, rows) {
  const node = $(id);
  node.replaceChildren();
  const head = document.createElement("tr");
  for (const name of header) head.appendChild(Relay.el("th", name));
  node.appendChild(head);
  if (!rows.length) {
    const empty = document.createElement("tr");
    const cell = Relay.el("td", "none", "muted");
    cell.colSpan = header.length;
    empty.appendChild(cell);
    node.appendChild(empty);
  }
  for (const row of rows) {
    const line = document.createElement("tr");
    for (const value of row) line.appendChild(Relay.el("td", Relay.printable(String(value ?? "–"))));
    node.appendChild(line);
  }
}

function seconds(value) {
  return value === null || value === undefined ? "–" : `${value} s`;
}

function render(status) {
  table("queues", ["queue", "queued"], Object.entries(status.queues));
  table(
    "workers",
    ["worker", "state", "jobs in flight", "heartbeat"],
    status.workers.map((w) => [w.name, w.state, w.jobs.length ? w.jobs.join(" ") : "none", seconds(w.last_heartbeat_age_s)]),
  );
  table(
    "in-flight",
    ["job", "model", "worker", "age", "tokens"],
    status.in_flight.map((j) => [j.job_id, j.model, j.worker, seconds(j.age_s), j.tokens]),
  );
  table(
    "failures",
    ["job", "error", "when"],
    status.recent_failures.map((f) => [f.job_id, f.error_type, `${f.age_s} s ago`]),
  );
  table(
    "consumers",
    ["group", "lag", "pending", "counters"],
    status.consumers.map((c) => [
      c.group,
      c.lag,
      c.pending,
      Object.entries(c.counters).map(([k, v]) => `${k} ${v}`).join(", "),
    ]),
  );
  $("status").hidden = false;
  $("updated").textContent = `updated ${new Date(status.taken_at * 1000).toLocaleTimeString()}`;
}

// One chain of refreshes at a time: a new key starts a new chain and the old one stops.
let chain = 0;

async function refresh(mine) {
  const key = sessionStorage.getItem(KEY_STORE) || "";
  const result = await Relay.call("/v1/status", { headers: Relay.bearer(key) });
  if (mine !== chain) return;
  if (result.ok) {
    Relay.say("problem", "");
    render(result.body);
  } else {
    Relay.say("problem", Relay.message(result, `refused (HTTP ${result.status})`));
    if (result.status === 401 || result.status === 403) return; // until another key is given
  }
  timer = setTimeout(() => refresh(mine), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    clearTimeout(timer);
    refresh(++chain);
  });
  if (sessionStorage.getItem(KEY_STORE)) refresh(++chain);
});
