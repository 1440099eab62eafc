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

const state = { devices: new Map(), jobs: new Map(), selected: null, tab: "fleet",
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
    state.devices.set(row.device, row);
    renderFleetRow(row);
    renderDevicePickers();
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
    const all = [...state.devices.values()];
    $("#fleet-summary").textContent = `${all.filter((d) => d.online).length} of ${all.length} device(s) online`;
  });
  source.addEventListener("frame", (e) => {
    const frame = JSON.parse(e.data);
    const row = state.devices.get(frame.device);
    if (row) row.frame = frame;
    if (frame.device === state.selected) { renderClasses(frame); requestImages(frame); }
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

// -- fleet ----------------------------------------------------------------------------------------
const fmt = (v, digits = 1) => (v === null || v === undefined) ? "–" :
  (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v));

function throttleText(flags) {
  if (!flags) return "–";
  const now = ["under_voltage", "freq_capped", "throttled", "soft_temp_limit"].filter((k) => flags[k]);
  if (now.length) return now.join(", ").replaceAll("_", " ");
  return (flags.throttling_occurred || flags.under_voltage_occurred) ? "earlier" : "no";
}

function onlineText(row) {
  return row.online === true ? "online" : row.online === false ? "offline" : "unknown";
}

function renderFleetRow(row) {
  const body = $("#fleet tbody");
  let tr = body.querySelector(`tr[data-device="${CSS.escape(row.device)}"]`);
  const cells = [
    null, null, row.model, row.runtime, row.delegate, fmt(row.threads), fmt(row.fps),
    fmt(row.inference_ms), fmt(row.end_to_end_ms), null, fmt(row.cpu_temp_c),
    throttleText(row.throttled), fmt(row.dropped), fmt(row.reconnects)];
  if (!tr) {
    tr = el("tr", { data: { device: row.device } });
    cells.forEach(() => tr.append(el("td")));
    tr.cells[0].append(el("a", { onclick: () => selectDevice(row.device, true) }, row.device));
    tr.cells[9].append(el("canvas", { class: "spark", width: 150, height: 36 }));
    const rows = [...body.rows, tr].sort((a, b) => a.dataset.device.localeCompare(b.dataset.device));
    body.append(...rows);
  }
  const online = onlineText(row);
  tr.dataset.online = String(row.online);
  tr.className = row.online === false ? "offline" : "";
  tr.cells[1].replaceChildren(el("span", { class: "badge " + (row.online ? "on" : row.online === false ? "off" : "unknown") },
                                 row.status === "error" && row.online ? "error" : online));
  if (row.error) tr.cells[1].title = row.error;
  cells.forEach((text, i) => {
    if (text === null) return;
    tr.cells[i].textContent = text ?? "–";
    if (i >= 5) tr.cells[i].className = "num";
  });
  drawSpark(tr.cells[9].firstChild, row.history || []);
  const all = [...state.devices.values()];
  $("#fleet-summary").textContent =
    `${all.filter((d) => d.online).length} of ${all.length} device(s) online`;
}

function drawSpark(canvas, history) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (!history.length) return;
  const now = Date.now() / 1000, span = Math.min(600, Math.max(60, now - history[0][0]));  // 1..10 min
  const values = history.flatMap((p) => [p[1], p[2]]).filter((v) => typeof v === "number");
  const top = Math.max(1, ...values) * 1.1;
  ctx.fillStyle = "#8892a0"; ctx.font = "9px sans-serif";
  ctx.fillText(top.toFixed(0), 1, 9);
  for (const [index, color] of [[1, "#2b6cb0"], [2, "#d97706"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 1.3; ctx.beginPath();
    let started = false;
    for (const p of history) {
      if (typeof p[index] !== "number") continue;
      const x = w - (now - p[0]) / span * w, y = h - 2 - p[index] / top * (h - 4);
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    }
    ctx.stroke();
  }
}

// -- device view ----------------------------------------------------------------------------------
function selectDevice(device, show) {
  state.selected = device;
  lastDrawn = { mask: -1, overlay: -1 };
  images.mask = images.overlay = null;
  if (show) showTab("device");
  $("#device-select").value = device;
  const row = state.devices.get(device);
  const ctx = $("#device-canvas").getContext("2d");
  ctx.clearRect(0, 0, ctx.canvas.width, ctx.canvas.height);
  if (row) { renderDeviceSide(row); renderClasses(row.frame); requestImages(row.frame); }
}

function renderDeviceSide(row) {
  const badge = $("#device-state");
  badge.textContent = onlineText(row);
  badge.className = "badge " + (row.online ? "on" : "off");
  const body = $("#device-stages tbody");
  body.replaceChildren(...Object.entries(row.stages || {}).map(([stage, ms]) =>
    el("tr", {}, el("td", {}, stage), el("td", { class: "num" }, fmt(ms, 2)))));
}

function renderClasses(frame) {
  if (!frame) return;
  const row = state.devices.get(frame.device) || {};
  const labels = row.labels || [];
  const entries = Object.entries(frame.classes || {}).sort((a, b) => b[1] - a[1]);
  $("#device-classes tbody").replaceChildren(...entries.map(([name, fraction]) => {
    const id = labels.indexOf(name);
    const swatch = el("span", { class: "swatch" });
    if (id >= 0) swatch.style.background = `rgb(${PALETTE[id].join(",")})`;
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(1, fraction * 120)}px`;
    return el("tr", {}, el("td", {}, swatch, name), el("td", { class: "num" }, (fraction * 100).toFixed(1) + " %"),
              el("td", {}, bar));
  }));
  $("#device-frame").textContent = frame.seq !== null && frame.seq !== undefined ? `frame ${frame.seq}` : "";
}

let inFlight = false;
let wanted = null;
let lastDrawn = { mask: -1, overlay: -1 };
const images = { mask: null, overlay: null };

function requestImages(frame) {
  if (!frame || state.tab !== "device") return;  // images are fetched only while they are seen
  if (frame.mask === lastDrawn.mask && frame.overlay === lastDrawn.overlay) return;
  wanted = frame;
  if (!inFlight) fetchImages();
}

async function fetchImages() {
  inFlight = true;
  try {
    while (wanted) {
      const frame = wanted;
      wanted = null;
      const device = encodeURIComponent(frame.device);
      const jobs = [];
      if (frame.mask > 0 && frame.mask !== lastDrawn.mask)
        jobs.push(api(`/api/devices/${device}/mask.png?n=${frame.mask}`).then(colourMask).then((c) => { images.mask = c; }));
      if (frame.overlay > 0 && frame.overlay !== lastDrawn.overlay)
        jobs.push(api(`/api/devices/${device}/overlay.jpg?n=${frame.overlay}`)
          .then((b) => createImageBitmap(b)).then((bmp) => { images.overlay = bmp; }));
      await Promise.all(jobs);
      if (frame.device !== state.selected) continue;
      draw();
      const newMask = frame.mask !== lastDrawn.mask;
      lastDrawn = { mask: frame.mask, overlay: frame.overlay };
      $("#device-canvas").dataset.maskN = String(frame.mask);
      if (newMask) {
        const drawn = window.consoleMetrics.drawn;
        drawn.push({ device: frame.device, n: frame.mask, t: performance.timeOrigin + performance.now() });
        if (drawn.length > 5000) drawn.splice(0, drawn.length - 5000);
      }
    }
  } catch (err) {
    console.warn("image update failed", err);
  } finally {
    inFlight = false;
  }
}

// A class-id PNG (grey, colour type 0) is coloured here with the PASCAL colormap; a palette PNG
// (colour type 3) already carries its colours. Class 0 (or black) stays transparent over the overlay.
async function colourMask(blob) {
  const head = new Uint8Array(await blob.slice(0, 26).arrayBuffer());
  const paletted = head.length >= 26 && head[25] === 3;
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  const image = ctx.getImageData(0, 0, bmp.width, bmp.height);
  const px = image.data;
  for (let i = 0; i < px.length; i += 4) {
    if (paletted) {
      px[i + 3] = (px[i] | px[i + 1] | px[i + 2]) ? 255 : 0;
    } else {
      const id = px[i], rgb = PALETTE[id];
      px[i] = rgb[0]; px[i + 1] = rgb[1]; px[i + 2] = rgb[2]; px[i + 3] = id ? 255 : 0;
    }
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

function draw() {
  const canvas = $("#device-canvas");
  const view = $("#device-view").value;
  const base = view !== "mask" && images.overlay ? images.overlay : null;
  const mask = view !== "overlay" ? images.mask : null;
  const size = base || mask;
  if (!size) return;
  if (canvas.width !== size.width || canvas.height !== size.height) {
    canvas.width = size.width; canvas.height = size.height;
  }
  canvas.classList.toggle("pixelated", !base);  // a mask alone: one block per class-id pixel, no blur
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (base) ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  if (mask) {
    ctx.globalAlpha = base ? 0.55 : 1.0;
    ctx.imageSmoothingEnabled = false;  // class boundaries stay crisp (no invented in-between colours)
    ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = 1.0;
  }
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
  for (const box of ["#bench-devices", "#deploy-devices"]) {
    const holder = $(box);
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
function renderTable(table, spec) {
  if (!spec) { table.replaceChildren(); return; }
  const head = el("thead", {}, el("tr", {}, ...spec.columns.map((c) => el("th", {}, c))));
  const rows = spec.cells.map((cells, r) => {
    const tr = el("tr", { class: spec.status[r] && spec.status[r] !== "done" ? "failed" : "" },
                  ...cells.map((c) => el("td", {}, c)));
    if (spec.reasons[r] && spec.status[r] !== "done") tr.title = spec.reasons[r];
    return tr;
  });
  table.replaceChildren(head, el("tbody", {}, ...rows));
}

function renderProgress(holder, job) {
  holder.replaceChildren(...Object.entries(job.progress).map(([device, p]) => {
    let text = p.status;
    let bar = null;
    if (p.phase) { text = `${p.phase} ${p.done}/${p.total}`; bar = el("progress", { max: p.total || 1, value: p.done || 0 }); }
    else if (p.stage) {
      text = p.stage + (p.received !== undefined ? ` ${p.received}/${p.total} bytes` : "");
      if (p.received !== undefined) bar = el("progress", { max: p.total || 1, value: p.received });
    }
    if (p.state) text += ` (${p.state})`;
    if (p.reason && p.status !== "done") text += `: ${p.reason}`;
    return el("div", { data: { device, status: p.status } }, el("b", {}, device + " "), bar || "", " " + text);
  }));
}

function setStatus(prefix, job) {
  const badge = $(`#${prefix}-status`);
  badge.textContent = `${job.kind} ${job.status}`;
  badge.className = "badge " + job.status;
  badge.dataset.job = job.id;
  badge.dataset.status = job.status;
  $(`#${prefix}-error`).textContent = job.error || "";
}

function renderJob(job) {
  if (job.id === state.benchJob) {
    setStatus("bench", job);
    renderProgress($("#bench-progress"), job);
    renderTable($("#bench-table"), job.table);
    $("#bench-start").disabled = job.status === "running";
    if (job.status !== "running" && job.samples_ms) {
      const link = $("#bench-report");
      link.href = `/api/jobs/${job.id}/report.json`;
      link.hidden = false;
      drawDistribution($("#bench-chart"), job.samples_ms);
    }
  } else if (job.id === state.deployJob) {
    setStatus("deploy", job);
    renderProgress($("#deploy-progress"), job);
    renderTable($("#deploy-table"), job.table);
    if (job.status !== "running") {
      for (const b of ["#deploy-start", "#rollback-start"]) $(b).disabled = false;
      refreshModels();
    }
  } else if (job.id === state.modelsJob) {
    renderTable($("#models-table"), job.table);
  }
}

// Latency distribution: a histogram per device over the same bins (ms on x).
function drawDistribution(canvas, samples) {
  const series = Object.entries(samples).filter(([, s]) => s.length);
  canvas.hidden = !series.length;
  if (!series.length) return;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 40, bottom = 28;
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap(([, s]) => s);
  const lo = Math.min(...all), hi = Math.max(...all);
  const bins = 40, width = (hi - lo) / bins || 1;
  const colours = ["#2b6cb0", "#d97706", "#1f8a4c", "#9b2c2c", "#6b46c1", "#2c7a7b"];
  const counts = series.map(([, s]) => {
    const c = new Array(bins).fill(0);
    for (const v of s) c[Math.min(bins - 1, Math.floor((v - lo) / width))] += 1 / s.length;
    return c;
  });
  const top = Math.max(...counts.flat()) * 1.1;
  ctx.strokeStyle = "#8892a0"; ctx.fillStyle = "#4a5568"; ctx.font = "11px sans-serif";
  ctx.beginPath(); ctx.moveTo(left, 5); ctx.lineTo(left, h - bottom); ctx.lineTo(w - 5, h - bottom); ctx.stroke();
  for (let k = 0; k <= 4; k++) {
    const v = lo + (hi - lo) * k / 4, x = left + (w - left - 10) * k / 4;
    ctx.fillText(v.toFixed(1) + " ms", x - 12, h - 10);
  }
  ctx.fillText("share of runs", 2, 14);
  counts.forEach((c, i) => {
    ctx.strokeStyle = colours[i % colours.length]; ctx.lineWidth = 2; ctx.beginPath();
    c.forEach((v, b) => {
      const x0 = left + (w - left - 10) * b / bins, x1 = left + (w - left - 10) * (b + 1) / bins;
      const y = h - bottom - v / top * (h - bottom - 10);
      if (b === 0) ctx.moveTo(x0, h - bottom);
      ctx.lineTo(x0, y); ctx.lineTo(x1, y);
    });
    ctx.lineTo(w - 10, h - bottom); ctx.stroke();
    ctx.fillStyle = colours[i % colours.length];
    ctx.fillText(series[i][0], w - 160, 16 + 14 * i);
  });
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
  if (name === "device" && row) requestImages(row.frame);
}

function renderAll() {
  $("#fleet tbody").replaceChildren();
  for (const row of state.devices.values()) renderFleetRow(row);
  renderDevicePickers();
  if (state.selected) selectDevice(state.selected, false);
  for (const job of state.jobs.values()) renderJob(job);
}

function wire() {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#device-select").addEventListener("change", (e) => selectDevice(e.target.value, false));
  $("#device-view").addEventListener("change", draw);
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
