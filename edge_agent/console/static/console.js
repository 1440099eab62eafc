// edge-agent console: plain JS, no build step. Live state arrives as Server-Sent Events
// (/api/events: hello, device, forget, frame, job); images and commands go through fetch() with the
// X-Console-Token header (never a cookie alone: CSRF-safe).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "data") Object.assign(node.dataset, v);
    else node[k] = v;
  }
  for (const kid of kids) node.append(kid instanceof Node ? kid : document.createTextNode(kid ?? ""));
  return node;
};

const state = { devices: new Map(), jobs: new Map(), selected: null, camera: null, tab: "fleet",
                benchJob: null, deployJob: null, modelsJob: null };
// For bench/console_latency.py: when each mask was drawn (ms since the epoch).
window.consoleMetrics = { drawn: [] };
let token = $('meta[name="console-token"]').content || sessionStorage.getItem("console-token") || "";

// -- PASCAL VOC colormap: class id -> [r, g, b] -----------------------------------------------------
const PALETTE = (() => {
  const out = [];
  for (let i = 0; i < 256; i++) {
    let r = 0, g = 0, b = 0, c = i;
    for (let j = 0; j < 8; j++) {
      r |= ((c >> 0) & 1) << (7 - j); g |= ((c >> 1) & 1) << (7 - j); b |= ((c >> 2) & 1) << (7 - j);
      c >>= 3;
    }
    out.push([r, g, b]);
  }
  return out;
})();

// -- API ------------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({ "X-Console-Token": token }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (response.status === 401) { showLogin(); throw new Error("token required"); }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}
const post = (path, doc) => api(path, { method: "POST", body: JSON.stringify(doc),
                                        headers: { "Content-Type": "application/json" } });

function showLogin(message) {
  $("#login").hidden = false;
  $("main").hidden = true;
  $("#login-error").textContent = message || "";
}

async function signIn(candidate) {
  token = candidate;
  try {
    await api("/api/session", { method: "POST" });
  } catch (err) {
    showLogin(err.message);
    return false;
  }
  sessionStorage.setItem("console-token", token);
  $("#login").hidden = true;
  $("main").hidden = false;
  return true;
}

// -- live events ----------------------------------------------------------------------------------
let source = null;
function connect() {
  if (source) source.close();
  source = new EventSource("/api/events");
  source.addEventListener("open", () => setLink(true));
  source.addEventListener("error", () => {
    setLink(false);
    // A refused stream (503: too many pages open) is not retried by the browser: try again later.
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 10000);
  });
  source.addEventListener("hello", (e) => {
    const doc = JSON.parse(e.data);
    state.devices = new Map(doc.devices.map((d) => [d.device, d]));
    for (const job of doc.jobs) state.jobs.set(job.id, job);
    renderBroker(doc.broker);
    renderAll();
  });
  source.addEventListener("broker", (e) => renderBroker(JSON.parse(e.data)));
  source.addEventListener("device", (e) => {
    const row = JSON.parse(e.data);
    const known = state.devices.has(row.device);
    state.devices.set(row.device, row);
    renderFleetRow(row);
    if (!known || !state.selected) renderDevicePickers();
    if (row.device === state.selected) renderDeviceSide(row);
  });
  source.addEventListener("forget", (e) => {
    const { device } = JSON.parse(e.data);
    state.devices.delete(device);
    $(`#fleet tbody tr[data-device="${CSS.escape(device)}"]`)?.remove();
    for (const box of ["#bench-devices", "#deploy-devices"])
      $(box).querySelector(`input[value="${CSS.escape(device)}"]`)?.parentElement.remove();
    if (state.selected === device) state.selected = null;
    renderDevicePickers();
    scheduleFleet();
  });
  source.addEventListener("frame", (e) => {
    const frame = JSON.parse(e.data);
    const row = state.devices.get(frame.device);
    if (row) row.frame = frame;
    if (frame.device === state.selected) showFrame(frame);
  });
  source.addEventListener("job", (e) => {
    const job = JSON.parse(e.data);
    state.jobs.set(job.id, job);
    renderJob(job);
  });
}

// While the broker is away the devices' states are not known: say so rather than show stale ones.
function renderBroker(broker) {
  const badge = $("#broker");
  badge.textContent = `broker ${broker.host}:${broker.port} ${broker.connected ? "connected" : "unreachable"}`;
  badge.className = "badge " + (broker.connected ? "on" : "off");
  badge.dataset.connected = String(broker.connected);
  document.body.classList.toggle("stale", !broker.connected);
}

function setLink(up) {
  const link = $("#link");
  link.textContent = up ? "live" : "reconnecting";
  link.className = "badge " + (up ? "on" : "off");
}

// -- formatting -----------------------------------------------------------------------------------
const fmt = (v, digits = 1) => (v === null || v === undefined) ? "–" :
  (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v));

function humanSize(bytes) {
  if (typeof bytes !== "number") return bytes ?? "–";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

// The store-and-forward backlog in words: what waits for the broker, what was replayed and lost.
function outboxText(box) {
  const parts = [box.messages ? `${box.messages} waiting (${humanSize(box.bytes)}, oldest ${duration(box.oldest_s || 0)})` : "empty"];
  if (box.replayed) parts.push(`${box.replayed} replayed`);
  if (box.dropped) parts.push(`${box.dropped} dropped over budget`);
  return parts.join(", ");
}

function ago(epochS) {
  if (!epochS) return "never";
  const s = Math.max(0, Date.now() / 1000 - epochS);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function duration(s) {
  if (typeof s !== "number") return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor(s % 86400 / 3600)} h`;
}

// 24 h local time, "16:49:03" (or "16:49" without seconds), whatever the browser's locale
function clock(epochS, seconds = true) {
  const d = new Date(epochS * 1000);
  return [d.getHours(), d.getMinutes(), ...(seconds ? [d.getSeconds()] : [])].map((n) => String(n).padStart(2, "0")).join(":");
}

// A name breaks only at its underscores, dots and dashes (never mid-word).
function breakable(text) {
  const span = el("span");
  String(text ?? "–").split(/(?<=[_.\-])/).forEach((part, i) => { if (i) span.append(el("wbr")); span.append(part); });
  return span;
}

// "last seen … ago" texts refresh every second
setInterval(() => {
  for (const node of document.querySelectorAll("[data-since]")) node.textContent = node.dataset.prefix + ago(Number(node.dataset.since));
}, 1000);
const seen = (epochS, prefix = "last seen ") => el("span", { data: { since: String(epochS || 0), prefix } }, prefix + ago(epochS));

function throttleText(flags) {
  if (!flags) return "–";
  const now = ["under_voltage", "freq_capped", "throttled", "soft_temp_limit"].filter((k) => flags[k]);
  if (now.length) return now.join(", ").replaceAll("_", " ");
  return (flags.throttling_occurred || flags.under_voltage_occurred) ? "earlier" : "no";
}

const threads = (n) => `${n} thread${n === 1 ? "" : "s"}`;

function onlineText(row) {
  return row.online === true ? "online" : row.online === false ? "offline" : "unknown";
}

// The state badge: error red, warning amber, ok green, offline grey; the reason as text beside it.
function levelOf(row) { return row.level || (row.online === false ? "offline" : row.online ? "ok" : "unknown"); }
function stateBadge(row) {
  const level = levelOf(row);
  const text = level === "ok" ? "online" : level;
  return el("span", { class: `badge ${level}`, data: { level } }, text);
}
function stateReason(row) {
  const level = levelOf(row);
  if (level === "offline") return el("span", { class: "reason offline" }, seen(row.last_seen), row.reason === "stopped" ? " (stopped)" : "");
  if (level === "ok" && row.reason === "running") return el("span");
  return el("span", { class: `reason ${level}` }, row.reason || "");
}

// -- fleet: filtered, paged (a fleet of 1,000 renders one page) -------------------------------------
const PAGE_SIZE = 50;
const fleet = { page: 0, timer: null };

function matches(row, text, level) {
  if (level && levelOf(row) !== level) return false;
  if (!text) return true;
  const hay = [row.device, row.model, ...(row.tags || [])].join(" ").toLowerCase();
  return text.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function scheduleFleet() {
  if (fleet.timer) return;
  fleet.timer = setTimeout(() => { fleet.timer = null; renderFleet(); }, 200);
}

function renderFleetRow(row) {
  // a device's row changed: redraw the visible page soon (batched: many devices report at once)
  scheduleFleet();
}

function renderFleet() {
  const all = [...state.devices.values()].sort((a, b) => a.device.localeCompare(b.device));
  const counts = { error: 0, warning: 0, ok: 0, offline: 0, unknown: 0 };
  for (const row of all) counts[levelOf(row)] = (counts[levelOf(row)] || 0) + 1;
  const summary = $("#fleet-summary");
  summary.replaceChildren(`${all.filter((d) => d.online).length} of ${all.length} device(s) online: `,
    ...["error", "warning", "ok", "offline"].filter((k) => counts[k]).map((k) =>
      el("span", { class: "count" }, el("span", { class: `badge ${k}` }, `${counts[k]} ${k}`))));
  const shown = all.filter((r) => matches(r, $("#fleet-filter").value.trim(), $("#fleet-state").value));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  fleet.page = Math.min(fleet.page, pages - 1);
  const page = shown.slice(fleet.page * PAGE_SIZE, (fleet.page + 1) * PAGE_SIZE);
  $("#fleet-page").textContent = shown.length > PAGE_SIZE || fleet.page
    ? `${fleet.page * PAGE_SIZE + 1}–${fleet.page * PAGE_SIZE + page.length} of ${shown.length}`
    : `${shown.length} shown`;
  $("#fleet-prev").disabled = fleet.page === 0;
  $("#fleet-next").disabled = fleet.page >= pages - 1;
  const body = $("#fleet tbody");
  const existing = new Map([...body.rows].map((tr) => [tr.dataset.device, tr]));
  const rows = page.map((row) => fillRow(existing.get(row.device) || newRow(row.device), row));
  body.replaceChildren(...rows);
}

// The fleet table's columns (index.html's headers carry the same data-col names).
const COLUMNS = ["device", "state", "groups", "model", "runtime", "fps", "inference", "end_to_end", "latency", "health"];
const OPTIONAL = new Set(["runtime", "latency"]);  // hidden at phone width
const NUMERIC = new Set(["fps", "inference", "end_to_end"]);

function newRow(device) {
  const tr = el("tr", { data: { device } });
  const heads = [...document.querySelectorAll("#fleet thead th")].map((th) => th.textContent);
  // data-label: the column's name inside the cell, for the phone layout (one card a device)
  COLUMNS.forEach((col, i) =>
    tr.append(el("td", { class: [OPTIONAL.has(col) ? "opt" : "", NUMERIC.has(col) ? "num" : ""].join(" ").trim(),
                         data: { col, label: heads[i] || col } })));
  const cell = (col) => tr.cells[COLUMNS.indexOf(col)];
  cell("device").append(el("a", { onclick: () => selectDevice(device, true) }, device));
  cell("latency").append(el("canvas", { class: "spark", width: 150, height: 40 }));
  return tr;
}

// One compact cell for what is usually fine: the CPU temperature, and throttling, dropped frames
// and reconnects only when there are any (the title has them all).
function healthCell(td, row, live) {
  const items = [];
  const hot = typeof row.cpu_temp_c === "number" && row.cpu_temp_c >= 80;
  if (typeof row.cpu_temp_c === "number") items.push([`${fmt(row.cpu_temp_c, 0)} °C`, hot ? "warn" : ""]);
  const throttle = throttleText(row.throttled);
  if (!["–", "no"].includes(throttle)) items.push([throttle === "earlier" ? "throttled earlier" : throttle, throttle === "earlier" ? "" : "warn"]);
  if (row.dropped) items.push([`${row.dropped} dropped`, ""]);
  if (row.reconnects) items.push([`${row.reconnects} reconnect${row.reconnects === 1 ? "" : "s"}`, ""]);
  const box = row.outbox;
  if (box && box.messages) items.push([`${box.messages} queued`, "warn"]);
  if (box && box.dropped) items.push([`${box.dropped} lost offline`, "warn"]);
  td.title = `CPU ${fmt(row.cpu_temp_c)} °C · throttling ${throttle} · dropped frames ${fmt(row.dropped)} · MQTT reconnects ${fmt(row.reconnects)}` +
    (box ? ` · outbox ${outboxText(box)}` : "");
  if (!live) td.replaceChildren("–");
  else if (!items.length) td.replaceChildren(el("span", { class: "dim" }, row.stats_at ? "ok" : "–"));
  else td.replaceChildren(...items.map(([text, cls]) => el("span", { class: `item ${cls}`.trim() }, text)));
}

function fillRow(tr, row) {
  const level = levelOf(row);
  const cell = (col) => tr.cells[COLUMNS.indexOf(col)];
  tr.dataset.online = String(row.online);
  tr.dataset.level = level;
  tr.className = `level-${level}` + (row.online === false ? " offline" : "");
  cell("state").replaceChildren(stateBadge(row), stateReason(row));
  cell("groups").replaceChildren(...(row.tags || []).map((t) => el("span", { class: "tag" }, t)));
  cell("model").replaceChildren(breakable(row.model));
  cell("model").className = "name";
  // runtime, then "delegate · threads" under it (what the device runs stays the same offline)
  const how = [row.delegate, row.threads ? threads(row.threads) : null].filter(Boolean).join(" · ");
  cell("runtime").replaceChildren(row.runtime || "–", ...(how ? [el("span", { class: "sub" }, how)] : []));
  // offline: no stale numbers (the state cell says "last seen … ago")
  const live = row.online !== false;
  for (const [col, value] of [["fps", row.fps], ["inference", row.inference_ms], ["end_to_end", row.end_to_end_ms]])
    cell(col).textContent = live ? fmt(value) : "–";
  healthCell(cell("health"), row, live);
  drawSpark(cell("latency").firstChild, live ? row.history || [] : []);
  return tr;
}

function drawSpark(canvas, history) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 26;
  ctx.clearRect(0, 0, w, h);
  if (!history.length) return;
  const now = Date.now() / 1000, span = 600;
  const values = history.flatMap((p) => [p[1], p[2]]).filter((v) => typeof v === "number");
  if (!values.length) return;
  // the scale ignores the slowest 5 % (start-up outliers) once there are enough points to tell
  const sorted = [...values].sort((a, b) => a - b);
  const top = Math.max(1, sorted[sorted.length >= 20 ? Math.floor(0.95 * (sorted.length - 1)) : sorted.length - 1]) * 1.2;
  ctx.save(); ctx.beginPath(); ctx.rect(0, 0, w, h); ctx.clip();
  ctx.fillStyle = "#5f6b7c"; ctx.font = "9px sans-serif";
  ctx.fillText(top.toFixed(0), 1, 9);
  ctx.fillText("0", 1, h - 2);
  ctx.fillText("-10 min", left, h - 1);
  ctx.fillText("now", w - 18, h - 1);
  const plotH = h - 12;
  ctx.strokeStyle = "#d9dee6"; ctx.beginPath(); ctx.moveTo(left - 2, 1); ctx.lineTo(left - 2, plotH); ctx.lineTo(w, plotH); ctx.stroke();
  for (const [index, color] of [[1, "#2b6cb0"], [2, "#d97706"]]) {
    const points = history.filter((p) => typeof p[index] === "number").map((p) =>
      [Math.min(w - 2, left + (w - left) * (1 - (now - p[0]) / span)), Math.max(1, plotH - 1 - p[index] / top * (plotH - 3))]);
    if (!points.length) continue;
    ctx.strokeStyle = ctx.fillStyle = color; ctx.lineWidth = 1.3; ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    // the newest point as a dot: a device heard for less than one step (30 s) has a single point,
    // which a line alone would not show
    const [x, y] = points[points.length - 1];
    ctx.beginPath(); ctx.arc(x, y, 2, 0, 2 * Math.PI); ctx.fill();
  }
  ctx.restore();
}

// -- device view ----------------------------------------------------------------------------------
const PASCAL_RGB = (id) => `rgb(${PALETTE[id].join(",")})`;

function classColour(row, name) {
  const id = (row.labels || []).indexOf(name);
  return id >= 0 ? PASCAL_RGB(id) : "#8892a0";
}

function selectDevice(device, show) {
  state.selected = device;
  state.camera = null;
  drawn = { key: null };
  if (show) showTab("device");
  $("#device-select").value = device;
  const ctx = $("#device-canvas").getContext("2d");
  ctx.clearRect(0, 0, ctx.canvas.width, ctx.canvas.height);
  delete $("#device-canvas").dataset.seq;
  for (const t of ["#device-classes", "#device-stages"]) { $(t + " tbody").replaceChildren(); delete $(t).dataset.seq; }
  $("#device-legend").replaceChildren();
  $("#device-frame").textContent = "";
  $("#device-events").replaceChildren();
  charts.device = null;
  const row = state.devices.get(device);
  if (row) { renderDeviceSide(row); showFrame(row.frame); }
  refreshHistory();
}

function fact(name, value) {
  return el("div", {}, el("dt", {}, name), el("dd", {}, value));
}

function renderDeviceSide(row) {
  const level = levelOf(row);
  const badge = $("#device-state");
  badge.textContent = level === "ok" ? "online" : level;
  badge.className = `badge ${level}`;
  badge.dataset.level = level;
  const alert = $("#device-alert");
  alert.hidden = !["error", "warning", "offline"].includes(level);
  alert.className = `alert ${level}`;
  if (level === "offline") alert.replaceChildren(`Offline (${row.reason || "connection lost"}): `, seen(row.last_seen, "last seen "),
                                                 ". What is shown below is from then.");
  else alert.textContent = `${level === "error" ? "Error" : "Warning"}: ${row.reason || ""}`;
  const uptime = row.online && row.started_at ? duration(Date.now() / 1000 - row.started_at) : "–";
  // the cameras: the agent's (info.cameras, config order), and any other a frame came from
  const cams = [...new Set([...(row.cameras || []).map((c) => c.id), ...Object.keys((row.frame || {}).cameras || {})])];
  $("#camera-pick").hidden = cams.length < 2;
  const select = $("#camera-select");
  if ([...select.options].map((o) => o.value).join() !== cams.join())
    select.replaceChildren(...cams.map((c) => el("option", { value: c }, c || "(default)")));
  if (state.camera === null && cams.length) state.camera = cams[0];
  select.value = state.camera ?? "";
  // several cameras: the source and fps of the camera shown (the device's total fps beside it)
  const camStats = (row.camera_stats || {})[state.camera ?? ""];
  const camInfo = (row.cameras || []).find((c) => c.id === (state.camera ?? ""));
  const source = camStats
    ? [camInfo && camInfo.kind, camStats.source_state].filter(Boolean).join(", ") + (camStats.source_error ? ` (${camStats.source_error})` : "")
    : [row.source, row.source_state].filter(Boolean).join(", ") + (row.source_error ? ` (${row.source_error})` : "");
  $("#device-facts").replaceChildren(
    fact("model", breakable(row.model || (row.status === "error" ? "none loaded" : "–"))),
    fact("runtime", row.runtime || "–"), fact("delegate", `${row.delegate || "–"}${row.threads ? `, ${threads(row.threads)}` : ""}`),
    fact("uptime", uptime), fact("last seen", seen(row.last_seen, "")),
    fact(camStats ? `source (${state.camera})` : "source", source || "–"),
    fact(camStats ? `fps (${state.camera})` : "fps", camStats ? `${fmt(camStats.fps)} (device ${fmt(row.fps)})` : fmt(row.fps)),
    fact("groups", (row.tags || []).join(", ") || "–"),
    fact("offline backlog", row.outbox ? outboxText(row.outbox) : "off"),
    fact("CPU", `${fmt(row.cpu_percent, 0)} %` + (row.cpu_temp_c != null ? `, ${fmt(row.cpu_temp_c)} °C` : "")));
  if (!drawn.ms) renderStages(row, null, null);  // interval timings (no frame drawn with its own)
}

// What the stages are, where the name alone misleads.
const STAGE_WHAT = {
  capture: "waiting for the next frame (fps pacing) and reading it: not part of end to end",
  queue: "waiting for the interpreter",
  end_to_end: "frame read → results published",
};

function renderStages(row, ms, seq) {
  const stages = ms || row.stages || {};
  const table = $("#device-stages");
  if (seq !== null && seq !== undefined && ms) table.dataset.seq = String(seq); else delete table.dataset.seq;
  $("#device-stages-note").textContent = ms ? `(ms, frame ${seq})`
    : row.stages_per === "interval" ? `(ms, mean over the last ${fmt(row.timings_interval_s, 0)} s)` : "(ms)";
  const order = ["preprocess", "queue", "inference", "postprocess", "encode", "publish", "end_to_end", "capture"];
  const names = Object.keys(stages).sort((a, b) => (order.indexOf(a) + 99) % 99 - (order.indexOf(b) + 99) % 99);
  table.querySelector("tbody").replaceChildren(...names.map((stage) =>
    el("tr", { class: stage === "end_to_end" ? "total" : "" }, el("td", {}, stage), el("td", { class: "num" }, fmt(stages[stage], 1)),
       el("td", { class: "what" }, STAGE_WHAT[stage] || ""))));
}

function renderClasses(row, classes, seq) {
  const entries = Object.entries(classes || {}).sort((a, b) => b[1] - a[1]);
  const table = $("#device-classes");
  if (seq !== null && seq !== undefined) table.dataset.seq = String(seq); else delete table.dataset.seq;
  table.querySelector("tbody").replaceChildren(...entries.map(([name, fraction]) => {
    const colour = classColour(row, name);
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour;
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(1, fraction * 120)}px`;
    bar.style.background = colour;
    return el("tr", {}, el("td", {}, swatch, name), el("td", { class: "num" }, (fraction * 100).toFixed(1) + " %"),
              el("td", {}, bar));
  }));
  $("#device-legend").replaceChildren(...entries.filter(([n]) => n !== "background").map(([name]) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = classColour(row, name);
    return el("span", {}, swatch, name);
  }));
}

// Frame truth: the picture, its class table, its timings and the caption are ONE frame's (one seq).
let drawn = { key: null };
let inFlight = false;
let wanted = null;

function pickFrame(frame) {
  const cams = (frame && frame.cameras) || {};
  // the chosen camera's frame (none yet: nothing, never another camera's); not chosen yet: the first
  const name = state.camera === null ? Object.keys(cams)[0] : state.camera;
  const cam = cams[name];
  if (!cam) return null;
  const photoView = $("#device-view").value === "photo";
  const part = photoView ? (cam.photo || cam.shown) : (cam.shown || cam.photo);
  if (!part) return null;
  const what = part.overlay && (photoView || !part.mask) ? "overlay" : "mask";
  return Object.assign({ what, device: frame.device, camera: name }, part);
}

function showFrame(frame) {
  if (!frame || state.tab !== "device") return;  // images are fetched only while they are seen
  const part = pickFrame(frame);
  if (!part) return;
  const key = `${part.device}/${part.camera}/${part.what}/${part.labelled ? part.seq : "n" + part.n}`;
  if (key === drawn.key) return;
  wanted = Object.assign(part, { key });
  if (!inFlight) fetchFrames();
}

// The frame label inside a mask PNG (tEXt "edge-agent-frame") or an overlay JPEG (COM segment).
async function readLabel(blob) {
  const bytes = new Uint8Array(await blob.slice(0, 4096).arrayBuffer());
  const text = (from, to) => new TextDecoder().decode(bytes.slice(from, to));
  const parse = (s) => { try { return JSON.parse(s); } catch (e) { return null; } };
  const view = new DataView(bytes.buffer);
  if (bytes[0] === 0x89 && bytes[1] === 0x50) {
    for (let pos = 8; pos + 8 <= bytes.length;) {
      const len = view.getUint32(pos), kind = text(pos + 4, pos + 8);
      if (kind === "tEXt") {
        const body = text(pos + 8, pos + 8 + len);
        if (body.startsWith("edge-agent-frame\0")) return parse(body.slice(17));
      }
      if (kind === "IDAT") return null;
      pos += 12 + len;
    }
  } else if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    for (let pos = 2; pos + 4 <= bytes.length && bytes[pos] === 0xff && bytes[pos + 1] !== 0xda;) {
      const len = view.getUint16(pos + 2);
      if (bytes[pos + 1] === 0xfe) {
        const body = text(pos + 4, pos + 2 + len);
        if (body.startsWith("edge-agent-frame ")) return parse(body.slice(17));
      }
      pos += 2 + len;
    }
  }
  return null;
}

async function fetchFrames() {
  inFlight = true;
  try {
    while (wanted) {
      const part = wanted;
      wanted = null;
      const device = encodeURIComponent(part.device);
      const query = part.labelled ? `seq=${part.seq}&camera=${encodeURIComponent(part.camera)}` : `n=${part.n}`;
      let blob;
      try {
        blob = await api(`/api/devices/${device}/${part.what === "mask" ? "mask.png" : "overlay.jpg"}?${query}`);
      } catch (err) {
        continue;  // that frame is gone already: the next one comes
      }
      const label = await readLabel(blob);
      if (part.labelled && (!label || label.seq !== part.seq || (label.camera || "") !== part.camera)) {
        console.warn("frame label mismatch: asked", part.camera, part.seq, "got", label);
        continue;  // never show one frame's picture with another's data
      }
      const picture = part.what === "mask" ? await colourMask(blob) : await createImageBitmap(blob);
      if (part.device !== state.selected || (state.camera !== null && part.camera !== state.camera)) continue;
      const row = state.devices.get(part.device) || {};
      draw(picture, part.what === "mask");
      const canvas = $("#device-canvas");
      canvas.dataset.seq = label ? String(label.seq) : "";
      canvas.dataset.camera = (label && label.camera) || "";  // the camera the picture's own label names
      canvas.dataset.what = part.what;
      if (part.what === "mask") canvas.dataset.maskN = String(part.n);
      renderClasses(row, part.classes, part.labelled ? part.seq : null);
      drawn = { key: part.key, ms: !!part.ms };
      renderStages(row, part.ms, part.seq);
      const when = part.capture_ts ? ` · captured ${clock(part.capture_ts)}` : "";
      $("#device-frame").textContent = part.labelled
        ? `${part.camera ? `camera ${part.camera} · ` : ""}frame ${part.seq}${when} · ${part.what === "mask" ? "mask" : "photo with its mask"}` +
          (part.what === "mask" && $("#device-view").value === "photo" ? " (this device publishes no photo: publish.overlay)" : "")
        : "newest mask (this device does not label its frames)";
      if (part.what === "mask") {
        const list = window.consoleMetrics.drawn;
        list.push({ device: part.device, n: part.n, seq: part.seq, t: performance.timeOrigin + performance.now() });
        if (list.length > 5000) list.splice(0, list.length - 5000);
      }
    }
  } catch (err) {
    console.warn("image update failed", err);
  } finally {
    inFlight = false;
  }
}

// A class-id PNG (grey, colour type 0) is coloured here with the PASCAL colormap; a palette PNG
// (colour type 3) already carries its colours. Class 0 (or black) is drawn black.
async function colourMask(blob) {
  const head = new Uint8Array(await blob.slice(0, 26).arrayBuffer());
  const paletted = head.length >= 26 && head[25] === 3;
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  if (paletted) return canvas;
  const image = ctx.getImageData(0, 0, bmp.width, bmp.height);
  const px = image.data;
  for (let i = 0; i < px.length; i += 4) {
    const rgb = PALETTE[px[i]];
    px[i] = rgb[0]; px[i + 1] = rgb[1]; px[i + 2] = rgb[2]; px[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

// One picture, drawn as it is: the device's photo (its mask blended in once) or the mask alone.
function draw(picture, isMask) {
  const canvas = $("#device-canvas");
  if (canvas.width !== picture.width || canvas.height !== picture.height) {
    canvas.width = picture.width; canvas.height = picture.height;
  }
  canvas.classList.toggle("pixelated", isMask);  // a mask: one block per class-id pixel, no blur
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = !isMask;
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;
}

// -- device charts (uPlot, shipped in static/vendor) and the event timeline -------------------------
const charts = { device: null, fps: null, latency: null, coverage: null, timer: null };

function chartWidth(holder) { return Math.max(260, holder.clientWidth - 4); }

function makeChart(holder, series, data, yLabel) {
  holder.replaceChildren();
  if (typeof uPlot === "undefined") { holder.append(el("p", { class: "none" }, "charts unavailable")); return null; }
  const opts = {
    width: chartWidth(holder), height: 180,
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, 1)] } },
    // 24 h clock like the rest of the page (uPlot's default labels are am/pm): seconds only when
    // the ticks are less than a minute apart
    axes: [{ stroke: "#5f6b7c", grid: { stroke: "#eef1f5" },
             values: (u, splits, axis, space, incr) => splits.map((v) => v == null ? "" : clock(v, incr < 60)) },
           { stroke: "#5f6b7c", grid: { stroke: "#eef1f5" }, label: yLabel, size: 52, labelSize: 18 }],
    series: [{ label: "time", value: (u, v) => v == null ? "–" : clock(v) }, ...series.map((s) => Object.assign({ width: 1.6, spanGaps: true,
                                                                    value: (u, v) => v == null ? "–" : v.toFixed(1) }, s))],
    legend: { live: true },
  };
  return new uPlot(opts, data, holder);
}

function setChart(name, holder, series, data, yLabel) {
  const key = series.map((s) => s.label).join("|");
  if (!data[0].length) {
    charts[name] = null;
    holder.replaceChildren(el("p", { class: "none" }, "no data yet (the last 10 minutes are kept while the console runs)"));
    return;
  }
  if (!charts[name] || charts[name]._key !== key || charts[name]._device !== state.selected) {
    charts[name] = makeChart(holder, series, data, yLabel);
    if (charts[name]) { charts[name]._key = key; charts[name]._device = state.selected; }
  } else {
    charts[name].setData(data);
  }
}

async function refreshHistory() {
  clearTimeout(charts.timer);
  charts.timer = setTimeout(refreshHistory, 3000);
  if (state.tab !== "device" || !state.selected) return;
  let doc;
  try {
    doc = await api(`/api/devices/${encodeURIComponent(state.selected)}/history?camera=${encodeURIComponent(state.camera ?? "")}`);
  } catch (err) { return; }
  if (doc.device !== state.selected) return;
  const m = doc.metrics;
  setChart("fps", $("#chart-fps"), [{ label: "fps", stroke: "#1f7a45" }], [m.t, m.fps || m.t.map(() => null)], "frames/s");
  setChart("latency", $("#chart-latency"), [{ label: "inference ms", stroke: "#2b6cb0" }, { label: "end to end ms", stroke: "#d97706" }],
           [m.t, m.inference || m.t.map(() => null), m.end_to_end || m.t.map(() => null)], "ms");
  const row = state.devices.get(state.selected) || {};
  const classes = Object.keys(doc.coverage).filter((k) => k !== "t");
  // the classes the camera watches (the agent says which: info.cameras[].watched), else those seen most
  const watched = doc.watched && doc.watched.length ? doc.watched : null;
  $("#coverage-caption").textContent = watched ? "Coverage of the watched classes (% of the frame)"
                                               : "Coverage of the classes seen most (% of the frame)";
  $("#events-note").textContent = watched ? `(watched classes: ${watched.join(", ")}; from the results; newest first)`
                                          : "(classes seen, from the results; newest first)";
  $("#device-events").dataset.watched = watched ? watched.join(",") : "";
  setChart("coverage", $("#chart-coverage"), classes.map((c) => ({ label: `${c} %`, stroke: classColour(row, c) })),
           [doc.coverage.t, ...classes.map((c) => doc.coverage[c].map((v) => v == null ? 0 : v * 100))], "% of frame");
  renderEvents(doc.events);
}

function renderEvents(events) {
  const list = $("#device-events");
  const row = state.devices.get(state.selected) || {};
  if (!events.length) {
    list.replaceChildren(el("li", { class: "none" }, list.dataset.watched ? "none of the watched classes seen yet" : "no class seen yet"));
    return;
  }
  list.replaceChildren(...events.map((e) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = classColour(row, e.class);
    const span = duration(e.end - e.start);
    const text = e.open ? ` since ${clock(e.start)} (${span} so far, ongoing)` : ` from ${clock(e.start)} to ${clock(e.end)} (${span})`;
    return el("li", { class: e.open ? "open" : "", data: { cls: e.class } }, swatch, el("b", {}, e.class), text,
              el("span", { class: "dim" }, ` · up to ${(e.peak * 100).toFixed(1)} % of the frame, ${e.frames} frames`));
  }));
}

// -- device pickers (benchmark, deploy) -----------------------------------------------------------
function renderDevicePickers() {
  const ids = [...state.devices.keys()].sort();
  const select = $("#device-select");
  if ([...select.options].map((o) => o.value).join() !== ids.join()) {
    select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
    if (state.selected) select.value = state.selected;
  }
  if (!state.selected && ids.length) selectDevice(ids[0], false);
  // groups (agent.tags): one button each that selects that group's online devices, and "all online"
  const groups = new Map();
  for (const id of ids) {
    const row = state.devices.get(id);
    for (const tag of (row.online && row.tags) || []) groups.set(tag, [...(groups.get(tag) || []), id]);
  }
  const online = ids.filter((id) => state.devices.get(id).online);
  const picks = [["all online", online], ...[...groups.entries()].sort(([a], [b]) => a.localeCompare(b))];
  for (const box of ["#bench-devices", "#deploy-devices"]) {
    const holder = $(box);
    let bar = holder.parentElement.querySelector(".group-pick");
    if (!bar) {
      bar = el("div", { class: "group-pick" });
      holder.before(bar);
    }
    const key = picks.map(([name, members]) => `${name}:${members.join(",")}`).join(";");
    if (bar.dataset.key !== key) {
      bar.dataset.key = key;
      bar.replaceChildren("select: ", ...picks.map(([name, members]) => el("button", {
        type: "button", class: "light small", data: { group: name },
        onclick: () => holder.querySelectorAll("input").forEach((i) => { i.checked = members.includes(i.value); }),
      }, `${name} (${members.length})`)));
    }
    for (const id of ids) {
      let input = holder.querySelector(`input[value="${CSS.escape(id)}"]`);
      if (!input) {
        input = el("input", { type: "checkbox", value: id });
        holder.append(el("label", {}, input, " " + id));
      }
      const online = state.devices.get(id).online;
      input.parentElement.className = online ? "" : "dim";
    }
  }
}

const chosen = (box) => [...$(box).querySelectorAll("input:checked")].map((i) => i.value);

// -- jobs (benchmark, models, deploy, rollback) ---------------------------------------------------
function renderTable(table, spec, kind) {
  if (!spec) { table.replaceChildren(); return; }
  const sizeCol = spec.columns.indexOf("size");
  const nameCol = spec.columns.indexOf("name");
  const head = el("thead", {}, el("tr", {}, ...spec.columns.map((c) => el("th", {}, c))));
  const rows = spec.cells.map((cells, r) => {
    cells = [...cells];
    let note = "";
    if (kind === "models" && nameCol >= 0 && cells[nameCol] === "(empty store)") {
      // the store holds deployed models only: say what runs (the configured model)
      const row = state.devices.get(cells[0]) || {};
      if (row.model) {
        cells[spec.columns.indexOf("role")] = "running";
        cells[nameCol] = row.model;
        if (spec.columns.indexOf("sha256") >= 0 && row.model_sha256) cells[spec.columns.indexOf("sha256")] = row.model_sha256.slice(0, 12);
        if (sizeCol >= 0) cells[sizeCol] = row.model_size;
        note = "configured model (not deployed: the store is empty)";
      }
    }
    if (sizeCol >= 0 && /^\d+$/.test(String(cells[sizeCol] ?? ""))) cells[sizeCol] = humanSize(Number(cells[sizeCol]));
    else if (sizeCol >= 0 && typeof cells[sizeCol] === "number") cells[sizeCol] = humanSize(cells[sizeCol]);
    const failed = spec.status[r] && spec.status[r] !== "done";
    const tds = cells.map((c, i) => {
      const td = el("td", { class: i === nameCol ? "name" : "" }, i === nameCol ? breakable(c) : c);
      if (i === 1 && spec.status[r]) {
        td.replaceChildren(el("span", { class: `badge ${failed ? "failed" : "done"}` }, c));
        if (failed && spec.reasons[r]) td.append(el("span", { class: "reason error" }, spec.reasons[r]));
      }
      return td;
    });
    if (note) tds[nameCol].append(el("span", { class: "reason ok" }, note));
    return el("tr", { class: failed ? "failed" : "" }, ...tds);
  });
  table.replaceChildren(head, el("tbody", {}, ...rows));
}

function renderProgress(holder, job) {
  holder.replaceChildren(...Object.entries(job.progress).map(([device, p]) => {
    let text = p.status;
    let bar = null;
    if (p.phase) { text = `${p.phase} ${p.done}/${p.total}`; bar = el("progress", { max: p.total || 1, value: p.done || 0 }); }
    else if (p.stage) {
      text = p.stage + (p.received !== undefined ? ` ${humanSize(p.received)} of ${humanSize(p.total)}` : "");
      if (p.received !== undefined) bar = el("progress", { max: p.total || 1, value: p.received });
    }
    if (p.state) text += ` (${p.state})`;
    if (p.reason && p.status !== "done") text += `: ${p.reason}`;
    return el("div", { data: { device, status: p.status }, class: ["failed", "rejected", "timeout", "offline"].includes(p.status) ? "error" : "" },
              el("b", {}, device + " "), bar || "", " " + text);
  }));
}

// The job's badge says how its devices came out: done / partly failed / failed (red), running.
function setStatus(prefix, job) {
  const badge = $(`#${prefix}-status`);
  const outcome = job.outcome || job.status;
  badge.textContent = `${job.kind} ${outcome}`;
  badge.className = "badge " + outcome.replace(" ", "-");
  badge.dataset.job = job.id;
  badge.dataset.status = job.status;
  badge.dataset.outcome = outcome;
  $(`#${prefix}-error`).textContent = job.error || "";
}

function renderJob(job) {
  if (job.id === state.benchJob) {
    setStatus("bench", job);
    renderProgress($("#bench-progress"), job);
    renderTable($("#bench-table"), job.table, "bench");
    $("#bench-start").disabled = job.status === "running";
    if (job.status !== "running" && job.samples_ms) {
      const link = $("#bench-report");
      link.href = `/api/jobs/${job.id}/report.json`;
      link.hidden = false;
      drawDistribution(job.samples_ms);
    }
  } else if (job.id === state.deployJob) {
    setStatus("deploy", job);
    renderProgress($("#deploy-progress"), job);
    renderTable($("#deploy-table"), job.table, "deploy");
    if (job.status !== "running") {
      for (const b of ["#deploy-start", "#rollback-start"]) $(b).disabled = false;
      refreshModels();
    }
  } else if (job.id === state.modelsJob) {
    renderTable($("#models-table"), job.table, "models");
  }
}

// Latency distribution: per device, the share of runs (%) in each of the same bins (ms on x).
function drawDistribution(samples) {
  const series = Object.entries(samples).filter(([, s]) => s.length);
  const figure = $("#bench-figure");
  figure.hidden = !series.length;
  if (!series.length || typeof uPlot === "undefined") return;
  const all = series.flatMap(([, s]) => s);
  const lo = Math.min(...all), hi = Math.max(...all);
  const bins = 30, width = (hi - lo) / bins || 1;
  const xs = Array.from({ length: bins + 1 }, (_, b) => lo + b * width);
  const colours = ["#2b6cb0", "#d97706", "#1f7a45", "#9b2c2c", "#6b46c1", "#2c7a7b"];
  const data = [xs, ...series.map(([, s]) => {
    const c = new Array(bins + 1).fill(0);
    for (const v of s) c[Math.min(bins - 1, Math.floor((v - lo) / width))] += 100 / s.length;
    return c;
  })];
  const holder = $("#bench-chart");
  holder.replaceChildren();
  charts.bench = new uPlot({
    width: chartWidth(holder), height: 240,
    scales: { x: { time: false, range: (u, a, b) => [a, b + (b - a) * 0.02] }, y: { range: (u, a, b) => [0, Math.max(b * 1.1, 1)] } },
    axes: [{ stroke: "#5f6b7c", grid: { stroke: "#eef1f5" }, label: "inference time (ms)", labelSize: 20,
             values: (u, vals) => vals.map((v) => v.toFixed(1)) },
           { stroke: "#5f6b7c", grid: { stroke: "#eef1f5" }, label: "share of runs (%)", size: 50, labelSize: 20 }],
    series: [{ label: "ms", value: (u, v) => v == null ? "–" : `${v.toFixed(1)}–${(v + width).toFixed(1)}` },
             ...series.map(([dev], i) => ({ label: dev, stroke: colours[i % colours.length], width: 2,
                                            paths: uPlot.paths.stepped({ align: 1 }),
                                            value: (u, v) => v == null ? "–" : `${v.toFixed(1)} %` }))],
  }, data, holder);
}

async function startJob(prefix, promise) {
  $(`#${prefix}-error`).textContent = "";
  try {
    const job = await promise;
    state.jobs.set(job.id, job);
    if (prefix === "bench") state.benchJob = job.id;
    else state.deployJob = job.id;
    renderJob(job);
  } catch (err) {
    $(`#${prefix}-error`).textContent = err.message;
    for (const b of ["#bench-start", "#deploy-start", "#rollback-start"]) $(b).disabled = false;
  }
}

async function refreshModels() {
  const devices = chosen("#deploy-devices");
  if (!devices.length) return;
  try {
    const job = await post("/api/models", { devices });
    state.modelsJob = job.id;
  } catch (err) {
    $("#deploy-error").textContent = err.message;
  }
}

// -- wiring ---------------------------------------------------------------------------------------
function showTab(name) {
  state.tab = name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== `tab-${name}`;
  const row = state.devices.get(state.selected);
  if (name === "device" && row) { showFrame(row.frame); refreshHistory(); }
}

function renderAll() {
  renderFleet();
  renderDevicePickers();
  if (state.selected) selectDevice(state.selected, false);
  for (const job of state.jobs.values()) renderJob(job);
}

function wire() {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#device-select").addEventListener("change", (e) => selectDevice(e.target.value, false));
  $("#device-view").addEventListener("change", () => {
    drawn.key = null;
    const row = state.devices.get(state.selected);
    if (row) showFrame(row.frame);
  });
  $("#camera-select").addEventListener("change", (e) => {
    state.camera = e.target.value;
    drawn.key = null;
    const row = state.devices.get(state.selected);
    if (row) { renderDeviceSide(row); showFrame(row.frame); }
    refreshHistory();
  });
  $("#fleet-filter").addEventListener("input", () => { fleet.page = 0; scheduleFleet(); });
  $("#fleet-state").addEventListener("change", () => { fleet.page = 0; scheduleFleet(); });
  $("#fleet-prev").addEventListener("click", () => { fleet.page = Math.max(0, fleet.page - 1); renderFleet(); });
  $("#fleet-next").addEventListener("click", () => { fleet.page += 1; renderFleet(); });
  window.addEventListener("resize", () => {
    for (const name of ["fps", "latency", "coverage", "bench"]) {
      const chart = charts[name];
      if (chart) chart.setSize({ width: chartWidth(chart.root.parentElement), height: 180 });
    }
  });
  $("#bench-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("#bench-start").disabled = true;
    $("#bench-report").hidden = true;
    startJob("bench", post("/api/bench", {
      devices: chosen("#bench-devices"), runs: Number($("#bench-runs").value),
      warmup: Number($("#bench-warmup").value), model: $("#bench-model").value.trim() || null,
      pipeline: $("#bench-pipeline").checked, pause: $("#bench-pause").checked }));
  });
  $("#models-refresh").addEventListener("click", refreshModels);
  $("#deploy-file").addEventListener("change", () => {
    const file = $("#deploy-file").files[0];
    if (file && !$("#deploy-name").value) $("#deploy-name").value = file.name.replace(/\.tflite$/i, "");
  });
  $("#deploy-start").addEventListener("click", () => {
    const file = $("#deploy-file").files[0];
    if (!file) { $("#deploy-error").textContent = "choose a model file"; return; }
    const name = $("#deploy-name").value.trim() || file.name.replace(/\.tflite$/i, "");
    const query = new URLSearchParams({ devices: chosen("#deploy-devices").join(","), name });
    const labels = $("#deploy-labels").files[0];
    $("#deploy-start").disabled = $("#rollback-start").disabled = true;
    startJob("deploy", (labels ? labels.text() : Promise.resolve(null)).then((text) => {
      if (text) query.set("labels", text);
      return api(`/api/deploy?${query}`, { method: "POST", body: file,
                                           headers: { "Content-Type": "application/octet-stream" } });
    }));
  });
  $("#rollback-start").addEventListener("click", () => {
    $("#deploy-start").disabled = $("#rollback-start").disabled = true;
    startJob("deploy", post("/api/rollback", { devices: chosen("#deploy-devices"),
                                               to: $("#rollback-to").value.trim() || null }));
  });
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await signIn($("#login-token").value.trim())) connect();
  });
}

function applyReadOnly() {
  // A viewer's console: no command can be sent, so none is offered (the server refuses them too).
  if ($('meta[name="console-read-only"]').content !== "true") return;
  for (const name of ["bench", "deploy"]) {
    const tab = document.querySelector(`button[data-tab="${name}"]`);
    if (tab) tab.hidden = true;  // their sections stay hidden: no tab switches to them
  }
  const note = document.createElement("p");
  note.className = "read-only-note";
  note.textContent = "Read-only console (viewer): benchmarks, deployments and rollbacks are not available here.";
  $("main").prepend(note);
}

async function main() {
  applyReadOnly();
  wire();
  if (token && !(await signIn(token))) return;
  if (!token) {
    // A token is configured on the server and we have none yet: ask for it.
    showLogin();
    return;
  }
  connect();
}

main();
