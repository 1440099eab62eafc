// edge-agent console: the Rollouts tab (staged rollouts: start, watch, cancel). Plain JS, no build
// step; it uses console.js's api() (token header, sign-in) and DOM helpers $/el, and adds its own
// section and stylesheet.
// Errors first: a failed gate is red with its reason as text; badges done / rolled back / failed /
// cancelled. The rollout logic runs on the server (edge_agent.fleet.rollout); this only shows it.
"use strict";

(() => {
  const readOnly = $('meta[name="console-read-only"]').content === "true";
  const ro = { selected: null, busy: false, devices: [], devicesAt: 0 };

  const link = el("link", { rel: "stylesheet", href: "/static/rollouts.css" });
  document.head.append(link);

  const section = el("section", { id: "tab-rollouts", className: "tab", hidden: true });
  section.innerHTML = `
    <form id="rollout-form" class="toolbar">
      <label>Devices <select id="rollout-target"></select></label>
      <fieldset id="rollout-pick" hidden><legend>Devices</legend><div class="devices" id="rollout-devices"></div></fieldset>
      <label>Model file <input id="rollout-file" type="file" accept=".tflite"></label>
      <label>Name <input id="rollout-name" size="14" placeholder="file name"></label>
      <label title="devices that have the model after each stage: counts or percentages, the last 100%">Stages
        <input id="rollout-stages" size="12" value="1,50%,100%"></label>
      <label title="seconds each stage runs before its gates are checked">Soak s <input id="rollout-soak" type="number" min="0" value="60" class="num"></label>
      <label title="seconds of reports before a swap that make each device's baseline">Baseline s <input id="rollout-baseline" type="number" min="1" value="15" class="num"></label>
      <label title="gate: fps after >= this x before (0: not checked)">fps ≥ <input id="rollout-fps" type="number" min="0" step="0.05" value="0.8" class="num">× before <span class="dim">(0 = off)</span></label>
      <label title="gate: inference p50 after <= this x before (0: not checked)">p50 ≤ <input id="rollout-p50" type="number" min="0" step="0.05" value="1.2" class="num">× before <span class="dim">(0 = off)</span></label>
      <button id="rollout-start" type="submit">Start rollout</button>
      <span id="rollout-error" class="error"></span>
    </form>
    <div class="scroll"><table id="rollouts-list" class="grid">
      <thead><tr><th>started</th><th>model</th><th>devices</th><th>stages</th><th>outcome</th></tr></thead>
      <tbody></tbody></table></div>
    <p id="rollouts-empty" class="dim">No rollout yet.</p>
    <div id="rollout-detail" hidden>
      <h3><span id="rollout-title"></span> <span id="rollout-outcome" class="badge"></span>
        <button id="rollout-cancel" type="button" class="light" hidden>Cancel and roll back</button></h3>
      <p id="rollout-error-text" class="error"></p>
      <p id="rollout-resume" class="dim" hidden></p>
      <ul id="rollout-report" class="rollout-report"></ul>
      <div id="rollout-stage-tables"></div>
      <details><summary>Progress lines</summary><pre id="rollout-lines" class="rollout-lines"></pre></details>
    </div>`;
  $("main").append(section);
  if (readOnly) $("#rollout-form").hidden = true;

  const two = (n) => String(n).padStart(2, "0");
  const when = (t) => {  // 2026-12-07 21:48:42, local time, whatever the browser's locale
    if (!t) return "";
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
           `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  };
  const short = (sha) => sha ? String(sha).slice(0, 12) : "";
  const num = (v) => (v === null || v === undefined) ? "–" : String(Math.round(v * 100) / 100);
  const badgeClass = (outcome) => String(outcome || "").replace(/ /g, "-");
  const badge = (node, outcome) => {
    node.textContent = outcome || "";
    node.className = `badge ${badgeClass(outcome)}`;
    node.dataset.outcome = outcome || "";
  };

  // -- the form ----------------------------------------------------------------------------------
  async function refreshDevices(force) {
    if (readOnly || (!force && Date.now() - ro.devicesAt < 10000)) return;
    ro.devicesAt = Date.now();
    try {
      ro.devices = (await api("/api/devices")).devices || [];
    } catch (err) {
      return;
    }
    const online = ro.devices.filter((d) => d.online);
    const groups = new Map();
    for (const d of online) for (const t of d.tags || []) groups.set(t, (groups.get(t) || 0) + 1);
    const target = $("#rollout-target");
    const was = target.value;
    const options = [...[...groups.keys()].sort().map((t) => el("option", { value: `group:${t}` },
                                                                  `group ${t} (${groups.get(t)} online)`)),
                     el("option", { value: "all" }, `all online devices (${online.length})`),
                     el("option", { value: "devices" }, "chosen devices…")];
    target.replaceChildren(...options);
    if ([...target.options].some((o) => o.value === was)) target.value = was;
    const box = $("#rollout-devices");
    const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    box.replaceChildren(...ro.devices.map((d) => el("label", {},
      el("input", { type: "checkbox", value: d.device, checked: checked.has(d.device) }), ` ${d.device}`)));
    $("#rollout-pick").hidden = target.value !== "devices";
  }

  function startRollout(e) {
    e.preventDefault();
    const error = $("#rollout-error");
    error.textContent = "";
    const file = $("#rollout-file").files[0];
    if (!file) { error.textContent = "choose a model file"; return; }
    const query = new URLSearchParams({
      name: $("#rollout-name").value.trim() || file.name.replace(/\.tflite$/i, ""),
      stages: $("#rollout-stages").value.trim(), soak_s: $("#rollout-soak").value,
      baseline_s: $("#rollout-baseline").value, fps_ratio: $("#rollout-fps").value, p50_ratio: $("#rollout-p50").value });
    const target = $("#rollout-target").value;
    if (target.startsWith("group:")) query.set("group", target.slice(6));
    else if (target === "all") query.set("all", "1");
    else query.set("devices", [...$("#rollout-devices").querySelectorAll("input:checked")].map((i) => i.value).join(","));
    $("#rollout-start").disabled = true;
    api(`/api/rollouts?${query}`, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } })
      .then((doc) => { ro.selected = doc.id; return tick(true); })
      .catch((err) => { error.textContent = err.message; })
      .finally(() => { $("#rollout-start").disabled = false; });
  }

  // -- the list and one rollout ------------------------------------------------------------------
  function renderList(doc) {
    const rows = doc.rollouts || [];
    $("#rollouts-empty").hidden = rows.length > 0;
    $("#rollouts-list").hidden = rows.length === 0;
    $("#rollouts-list tbody").replaceChildren(...rows.map((r) => {
      const b = el("span");
      badge(b, r.outcome);
      const stages = el("span", { class: "stage-dots" }, ...r.stages.map((s, i) =>
        el("span", { class: `dot ${s}`, title: `stage ${i + 1}: ${s}` }, String(i + 1))));
      const tr = el("tr", { data: { id: r.id }, className: r.id === ro.selected ? "selected" : "" },
        el("td", {}, el("a", {}, when(r.started_at))), el("td", {}, r.model.name || short(r.model.sha256)),
        el("td", { class: "num" }, String(r.devices)), el("td", {}, stages),
        el("td", {}, b, r.first_failure ? el("span", { class: "reason error" }, r.first_failure) : ""));
      tr.addEventListener("click", () => { ro.selected = r.id; tick(true); });
      return tr;
    }));
  }

  function gateCell(result, stageStatus) {
    if (!result) return el("td", { class: "dim" }, stageStatus === "cancelled" ? "not checked" : "pending");
    if (result.ok) return el("td", { class: "gate-ok" }, "passed");
    return el("td", { class: "gate-failed" }, ...result.failed.map((line) => el("span", { class: "gate-line" }, line)));
  }

  function compare(result, key, unit) {
    if (!result) return el("td", { class: "num dim" }, "");
    const b = result.before && result.before[key], a = result.after && result.after[key];
    const ratio = b && a !== null && a !== undefined ? ` (${(a / b).toFixed(2)}×)` : "";
    return el("td", { class: "num" }, `${num(b)} → ${num(a)}${unit}${ratio}`);
  }

  function renderDetail(doc) {
    $("#rollout-detail").hidden = false;
    $("#rollout-detail").dataset.id = doc.id;
    $("#rollout-title").textContent = `${doc.model.name || "model"} (${short(doc.model.sha256)}) to ` +
      `${doc.devices.length} device(s), started ${when(doc.started_at)}`;
    badge($("#rollout-outcome"), doc.cancelling && doc.status === "running" ? "cancelling" : doc.outcome);
    const cancel = $("#rollout-cancel");
    cancel.hidden = readOnly || doc.status !== "running";
    cancel.disabled = !!doc.cancelling;
    $("#rollout-error-text").textContent = doc.error || "";
    const resume = $("#rollout-resume");
    resume.hidden = !doc.resume;
    resume.textContent = doc.resume ? `Interrupted (not run by this console): resume it with ${doc.resume}` : "";
    $("#rollout-report").replaceChildren(...doc.report.map((line) =>
      el("li", { class: / failed /.test(line) ? "failed" : "" }, line)));
    const n = doc.stages.length;
    $("#rollout-stage-tables").replaceChildren(...doc.stages.map((stage, i) => {
      const head = el("h4", {}, `Stage ${i + 1}/${n} · ${stage.devices.length} device(s) `);
      const b = el("span", { class: `badge ${badgeClass(stage.status)}` }, stage.status);
      head.append(b);
      const rows = stage.devices.map((dev) => {
        const result = (stage.results || {})[dev];
        const back = doc.rolled_back[dev];
        return el("tr", { data: { device: dev }, className: result && !result.ok ? "failed" : "" },
          el("td", {}, dev), gateCell(result, stage.status), compare(result, "fps", ""), compare(result, "p50_ms", " ms"),
          el("td", { class: back === undefined ? "dim" : (back === "done" ? "" : "gate-failed") },
             back === undefined ? "" : (back === "done" ? "rolled back" : `rollback ${back}`)),
          el("td", { class: "dim" }, short((stage.previous || {})[dev])));
      });
      const table = el("table", { class: "grid rollout-stage", data: { stage: String(i + 1) } },
        el("thead", {}, el("tr", {}, ...["device", "gates", "fps before → after", "inference p50 before → after",
                                          "rollback", "previous model"].map((t) => el("th", {}, t)))),
        el("tbody", {}, ...rows));
      return el("div", { class: "rollout-stage-box" }, head, el("div", { class: "scroll" }, table));
    }));
    $("#rollout-lines").textContent = (doc.lines || []).join("\n");
  }

  async function tick(force) {
    if (section.hidden && !force) return;
    if (ro.busy) return;
    ro.busy = true;
    try {
      const list = await api("/api/rollouts");
      if (!ro.selected) {  // the running one (once its state file is written), else the newest
        ro.selected = (list.rollouts.find((r) => r.id === list.running) || list.rollouts[0] || {}).id || null;
      }
      renderList(list);
      if (ro.selected) renderDetail(await api(`/api/rollouts/${encodeURIComponent(ro.selected)}`));
      refreshDevices(false);
    } catch (err) {
      $("#rollout-error").textContent = err.message;
    } finally {
      ro.busy = false;
    }
  }

  $("#rollout-form").addEventListener("submit", startRollout);
  $("#rollout-target").addEventListener("change", () => {
    $("#rollout-pick").hidden = $("#rollout-target").value !== "devices";
  });
  $("#rollout-file").addEventListener("change", () => {
    const file = $("#rollout-file").files[0];
    if (file && !$("#rollout-name").value) $("#rollout-name").value = file.name.replace(/\.tflite$/i, "");
  });
  $("#rollout-cancel").addEventListener("click", () => {
    const id = $("#rollout-detail").dataset.id;
    $("#rollout-cancel").disabled = true;
    api(`/api/rollouts/${encodeURIComponent(id)}/cancel`, { method: "POST" })
      .then(() => tick(true))
      .catch((err) => { $("#rollout-error-text").textContent = err.message; $("#rollout-cancel").disabled = false; });
  });
  const button = $('#tabs button[data-tab="rollouts"]');
  if (button) button.addEventListener("click", () => { refreshDevices(true); tick(true); });
  setInterval(() => tick(false), 1000);
})();
