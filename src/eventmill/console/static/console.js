// The eventmill console page: draws what the server pushes over server-sent events
// (one "history" message, then a "state" message per read). No framework, no build.
"use strict";

const consoleState = {
  config: null,
  lag: {},        // group -> [[time, events, seconds], ...]
  changes: [],    // newest last
  updates: 0,
  loadedAt: Date.now() + Math.random(),
};
window.eventmillConsole = consoleState;
const CHART_WINDOW_MS = 5 * 60 * 1000;
const MAX_CHANGES = 200;

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(1)} s` : `${Math.round(value)} s`;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString();
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderNodes(state) {
  const rows = state.nodes.map((node) =>
    el("tr", { "data-node": node.node_id, "data-leader": String(node.leader), "data-health": node.health },
      el("td", {}, node.node_id),
      el("td", {}, node.mode),
      el("td", { class: node.leader ? "leader" : null }, node.leader ? (state.leader && state.leader.term ? `leader, term ${state.leader.term}` : "leader") : ""),
      el("td", {}, node.health),
      el("td", { class: "number" }, seconds(node.heartbeat_age)),
      el("td", { class: "number" }, node.subscribers),
      el("td", { class: "number", "data-sources": node.sources }, node.sources)));
  replaceRows(document.querySelector("#nodes tbody"), rows);
}

function chart(group) {
  const width = 320, height = 90, pad = 4;
  const samples = consoleState.lag[group] || [];
  const now = Date.now();
  const max = Math.max(1, ...samples.map((sample) => sample[1]));
  const points = samples.map(([time, events]) => {
    const x = pad + (width - 2 * pad) * (1 - (now - Date.parse(time)) / CHART_WINDOW_MS);
    const y = height - pad - (height - 2 * pad) * (events / max);
    return `${Math.max(pad, x).toFixed(1)},${y.toFixed(1)}`;
  });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("data-points", samples.length);
  svg.setAttribute("data-max", max);
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points.join(" "));
  const label = document.createElementNS(svg.namespaceURI, "text");
  label.setAttribute("x", pad + 2);
  label.setAttribute("y", 12);
  label.textContent = `lag, last 5 min (max ${max})`;
  svg.append(line, label);
  return svg;
}

function actionButton(name, label, fields, description) {
  if (!consoleState.config.actions_enabled || !(name in consoleState.config.actions)) return null;
  return el("button", { type: "button", "data-action": name, "data-fields": JSON.stringify(fields), "data-description": description }, label);
}

function renderGroups(state) {
  const groups = state.groups.map((group) => {
    const sources = group.sources.map((source) =>
      el("tr", { "data-source": source.key, "data-node": source.node_id || "", "data-state": source.state },
        el("td", {}, source.source),
        el("td", {}, source.node_id || "unheld"),
        el("td", {}, source.subscriber_id || ""),
        el("td", {}, source.state),
        el("td", { class: "number" }, source.epoch),
        el("td", { class: "number" }, source.checkpoint === null ? "–" : source.checkpoint),
        el("td", { class: "number", "data-lag": source.lag }, source.lag),
        el("td", { class: "number" }, seconds(source.lag_seconds))));
    const table = el("table", { class: "sources" },
      el("thead", {}, el("tr", {}, ...["source", "node", "subscriber", "state", "epoch", "checkpoint", "lag", "lag age"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...sources));
    const head = el("div", { class: "group-head" },
      el("h3", {}, group.group),
      el("span", {}, "lag ", el("b", { "data-group-lag": group.lag }, group.lag), " events"),
      el("span", {}, "oldest unprocessed ", el("b", {}, seconds(group.lag_seconds))),
      el("span", {}, "throughput ", el("b", {}, group.throughput === null ? "–" : `${group.throughput}/s`)),
      el("span", {}, `${group.subscribers.length} subscribers, ${group.sources.length} sources`),
      actionButton("reset", "Reset…", { group: group.group }, `Reset group ${group.group} to the start?`),
      actionButton("retire", "Retire…", { group: group.group }, `Retire group ${group.group}?`));
    return el("div", { class: "group", "data-group": group.group }, head, el("div", { class: "group-body" }, chart(group.group), table));
  });
  document.getElementById("groups").replaceChildren(...groups);
}

function renderParked(state) {
  const section = document.getElementById("parked-section");
  const parked = state.parked;
  section.hidden = !parked || parked.length === 0;
  if (!parked) return;
  const rows = parked.map((entry) =>
    el("tr", { "data-parked": `${entry.group}/${entry.stream}` },
      el("td", {}, entry.group),
      el("td", {}, entry.stream),
      el("td", {}, entry.since ? clock(entry.since) : ""),
      el("td", {}, `${entry.event_name} #${entry.sequence_number}, ${entry.held} held`),
      el("td", { class: "number" }, entry.attempts ?? ""),
      el("td", {}, entry.error || ""),
      el("td", {}, entry.request || ""),
      el("td", {},
        actionButton("retry", "Retry…", { group: entry.group, category: entry.category, stream: entry.stream }, `Retry the held events of ${entry.category}/${entry.stream} in ${entry.group}?`),
        actionButton("skip", "Skip…", { group: entry.group, category: entry.category, stream: entry.stream }, `Skip the held events of ${entry.category}/${entry.stream} in ${entry.group}?`))));
  replaceRows(document.querySelector("#parked tbody"), rows);
}

function renderWatermark(state) {
  // What holds log and category readers back: shown only where something can (PostgreSQL).
  const holdback = state.read_holdback;
  const section = document.getElementById("watermark-section");
  section.hidden = !holdback;
  if (!holdback) return;
  const oldest = holdback.oldest;
  const held = !oldest ? "no publish in flight"
    : oldest.prepared_as ? `held back ${seconds(holdback.seconds)} by prepared transaction ${oldest.prepared_as} (xid ${oldest.transaction_id})`
    : `held back ${seconds(holdback.seconds)} by pid ${oldest.pid}, xid ${oldest.transaction_id}, application_name ${oldest.application_name || "–"}, ${oldest.state}`;
  const text = document.getElementById("watermark");
  text.dataset.pid = oldest && oldest.pid !== null ? oldest.pid : "";
  text.dataset.eventsBeyond = holdback.events_beyond;
  text.replaceChildren(`watermark ${holdback.watermark}: ${held}; `, el("b", {}, holdback.events_beyond), " committed events beyond it");
}

function renderChanges() {
  const rows = consoleState.changes.slice(-50).reverse().map((change) =>
    el("tr", { "data-kind": change.kind },
      el("td", {}, clock(change.at)),
      el("td", {}, change.kind),
      el("td", {}, change.group || ""),
      el("td", {}, change.source || ""),
      el("td", {}, change.from_node || ""),
      el("td", {}, change.to_node || ""),
      el("td", { class: "number" }, change.epoch ?? ""),
      el("td", {}, change.reason)));
  replaceRows(document.querySelector("#changes tbody"), rows);
}

function render(state) {
  consoleState.updates += 1;
  document.getElementById("updated").textContent = `read ${clock(state.read_at)}`;
  const error = document.getElementById("read-error");
  error.hidden = !state.error;
  if (state.error) {
    error.textContent = `last read failed: ${state.error}`;
    return;
  }
  document.getElementById("database-time").textContent = `database ${state.database_ms} ms`;
  for (const group of state.groups) {
    const samples = (consoleState.lag[group.group] ||= []);
    samples.push([state.read_at, group.lag, group.lag_seconds]);
    const oldest = Date.parse(state.read_at) - CHART_WINDOW_MS;
    while (samples.length && Date.parse(samples[0][0]) < oldest) samples.shift();
  }
  consoleState.changes.push(...state.changes);
  consoleState.changes.splice(0, Math.max(0, consoleState.changes.length - MAX_CHANGES));
  document.getElementById("warnings").replaceChildren(...state.warnings.map((warning) => el("li", {}, warning)));
  renderNodes(state);
  renderGroups(state);
  renderParked(state);
  renderWatermark(state);
  renderChanges();
}

async function act(button) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = button.dataset.description;
  document.getElementById("confirm-result").textContent = "";
  dialog.returnValue = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  if (dialog.returnValue !== "ok") return;
  const token = document.getElementById("token").value;
  sessionStorage.setItem("eventmill-token", token);
  const response = await fetch(`api/actions/${button.dataset.action}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ ...JSON.parse(button.dataset.fields), confirmed: true }),
  });
  const answer = await response.json();
  consoleState.lastAction = { status: response.status, ...answer };
  document.getElementById("read-error").hidden = response.ok;
  if (!response.ok) document.getElementById("read-error").textContent = `${button.dataset.action} refused (${response.status}): ${answer.error}`;
}

async function start() {
  consoleState.config = await (await fetch("api/config")).json();
  document.getElementById("title").textContent = consoleState.config.title;
  document.title = `${consoleState.config.title} – eventmill console`;
  if (consoleState.config.actions_enabled) {
    document.getElementById("token-form").hidden = false;
    document.getElementById("token").value = sessionStorage.getItem("eventmill-token") || "";
  }
  document.body.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) act(button);
  });
  const badge = document.getElementById("connection");
  const events = new EventSource("api/events");
  events.onopen = () => { badge.textContent = "live"; badge.dataset.connected = "true"; };
  events.onerror = () => { badge.textContent = "reconnecting"; badge.dataset.connected = "false"; };
  events.addEventListener("history", (event) => {
    const history = JSON.parse(event.data);
    consoleState.lag = history.lag;
    consoleState.changes = history.changes;
  });
  events.addEventListener("state", (event) => render(JSON.parse(event.data)));
}

start();
