// agent-factory console. Plain JavaScript, no build step, no framework.
// Every action is an operation call: POST /v1/ops/<name> with the session cookie (sent by the
// browser) and the session's CSRF token in X-AF-CSRF. Live updates arrive as server-sent
// events from /console/events; each names a topic, and the page reloads the panels of it.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
let csrf = null;
let events = null;

// ---- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function ago(ms, now = Date.now()) {
  if (!ms) return "—";
  const s = Math.round((now - ms) / 1000);
  if (s < 0) return "in " + dur(-s);
  return dur(s) + " ago";
}
function dur(s) {
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return Math.round(s / 3600) + " h";
}
function when(ms) { return ms ? new Date(ms).toLocaleString() : "—"; }

function flash(text, isError = false) {
  const f = $("#flash");
  f.textContent = text;
  f.className = "flash" + (isError ? " error" : "");
  f.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.hidden = true; }, isError ? 12000 : 5000);
}

function fill(tbody, rows, cols) {
  tbody.replaceChildren();
  if (!rows.length) tbody.append(el("tr", {}, el("td", { class: "empty", colspan: cols }, "none")));
  else rows.forEach((r) => tbody.append(r));
}

function formValues(form) {
  const out = {};
  for (const field of form.elements) {
    if (!field.name) continue;
    out[field.name] = field.type === "checkbox" ? field.checked : field.value.trim();
  }
  return out;
}

// ---- operations and session ------------------------------------------------------------

class OpError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function op(name, args = {}) {
  const res = await fetch("/v1/ops/" + name, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-AF-CSRF": csrf || "" },
    body: JSON.stringify(args),
  });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const err = body && body.error ? body.error : { code: "http_" + res.status, message: res.statusText };
    if (res.status === 401) showLogin("Your session ended; log in again.");
    throw new OpError(res.status, err.code, err.message);
  }
  return body;
}

// Runs an action, reporting its outcome in the flash line.
async function act(what, fn) {
  try {
    const result = await fn();
    flash(what + ": done");
    return result;
  } catch (e) {
    flash(what + " failed: " + e.message, true);
    return undefined;
  }
}

function showLogin(message) {
  csrf = null;
  if (events) { events.close(); events = null; }
  $("#app-view").hidden = true;
  $("#logout").hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = message || "";
  setLive(false);
}

async function startApp(session) {
  csrf = session.csrf;
  $("#login-view").hidden = true;
  $("#app-view").hidden = false;
  $("#logout").hidden = false;
  $("#webhook-url").textContent = session.webhookUrl;
  connectEvents();
  await refreshAll();
}

function setLive(on) {
  const live = $("#live");
  live.textContent = on ? "live" : "offline";
  live.className = "pill" + (on ? "" : " off");
}

// ---- live updates ----------------------------------------------------------------------

const pending = new Set();
function schedule(topic) {
  pending.add(topic);
  clearTimeout(schedule.timer);
  // Coalesce a burst of changes into one reload of each panel.
  schedule.timer = setTimeout(() => {
    const topics = [...pending];
    pending.clear();
    if (topics.includes("resync")) return refreshAll();
    if (topics.includes("queue")) { loadQueue(); reinspect(); }
    if (topics.includes("workers")) { loadWorkers(); reinspect(); }
    if (topics.includes("pairing")) loadPairing();
  }, 150);
}

function connectEvents() {
  if (events) events.close();
  events = new EventSource("/console/events");
  events.onopen = () => setLive(true);
  events.onmessage = (e) => {
    try { schedule(JSON.parse(e.data).topic); } catch (_) { /* not ours */ }
  };
  events.onerror = async () => {
    setLive(false);
    // The browser reconnects by itself; if the session is gone, stop and ask for a login.
    const res = await fetch("/console/session", { credentials: "same-origin" });
    if (res.status === 401) showLogin("Your session ended; log in again.");
  };
}

// ---- panels ----------------------------------------------------------------------------

async function refreshAll() {
  await Promise.allSettled([loadQueue(), loadWorkers(), loadAgents(), loadProvider(), loadSkills(), loadPairing()]);
  await loadSecrets();
  reinspect();
}

function inspectButton(conversationId) {
  return el("button", { class: "small secondary", "data-inspect": conversationId, onclick: () => inspect(conversationId) }, "Inspect");
}

async function loadQueue() {
  const [stats, queued, processing, dead] = await Promise.all([
    op("getQueueStats"),
    op("listJobsByStatus", { status: "queued", limit: 100 }),
    op("listJobsByStatus", { status: "processing", limit: 100 }),
    op("listJobsByStatus", { status: "dead_letter", limit: 100 }),
  ]);
  $("#queue-stats").replaceChildren(
    el("div", { class: "stat", id: "stat-ready" }, el("b", {}, String(stats.queuedReady)), el("span", {}, "ready")),
    el("div", { class: "stat", id: "stat-processing" }, el("b", {}, String(stats.processing)), el("span", {}, "processing")),
    el("div", { class: "stat", id: "stat-dead" }, el("b", {}, String(stats.deadLetter)), el("span", {}, "dead letter")),
  );
  const now = Date.now();
  fill($("#jobs-table tbody"), [...processing, ...queued].map((j) => el("tr", { "data-message": j._id },
    el("td", { class: "mono" }, j._id),
    el("td", {}, j.conversationId),
    el("td", {}, j.agentKey),
    el("td", {}, el("span", { class: "pill " + (j.status === "processing" ? "" : "info") }, j.status)),
    el("td", {}, j.attempts + " / " + j.maxAttempts),
    el("td", {}, j.scheduledFor > now ? ago(j.scheduledFor, now) : "now"),
    el("td", {}, inspectButton(j.conversationId)),
  )), 7);
  fill($("#dead-table tbody"), dead.map((j) => el("tr", { "data-message": j._id },
    el("td", { class: "mono" }, j._id),
    el("td", {}, j.conversationId),
    el("td", {}, String(j.attempts)),
    el("td", {}, j.lastError || ""),
    el("td", {},
      el("button", { class: "small", onclick: () => act("Requeue", () => op("requeueDeadLetter", { messageId: j._id })) }, "Requeue"), " ",
      el("button", { class: "small danger", onclick: () => confirm("Delete this dead letter for good?") && act("Purge", () => op("purgeDeadLetter", { messageId: j._id })) }, "Purge"), " ",
      inspectButton(j.conversationId)),
  )), 5);
}

function machineOf(w) {
  if (w.machineRef) return [w.machineRef.appName, w.machineRef.machineId, w.machineRef.region].filter(Boolean).join(" / ");
  return w.provider;
}

async function loadWorkers() {
  const workers = await op("listWorkersForScheduler");
  const now = Date.now();
  const shown = workers.filter((w) => w.status !== "stopped").concat(workers.filter((w) => w.status === "stopped").slice(0, 20));
  fill($("#workers-table tbody"), shown.map((w) => el("tr", { "data-worker": w.workerId },
    el("td", { class: "mono" }, w.workerId),
    el("td", {}, el("span", { class: "pill " + (w.status === "active" ? "" : w.status === "stopped" ? "off" : "warn") }, w.status)),
    el("td", {}, w.assignment ? w.assignment.conversationId : "—"),
    el("td", {}, machineOf(w)),
    el("td", {}, ago(w.heartbeatAt, now)),
    el("td", {}, w.scheduledShutdownAt ? ago(w.scheduledShutdownAt, now) : "—"),
    el("td", {}, String(w.load)),
  )), 7);
}

// The inspector: one call of explainConversation.
let inspected = null;
function reinspect() { if (inspected) inspect(inspected, false); }

function traceLink(traceId) {
  const base = localStorage.getItem("af.traceBase") || "http://localhost:16686/trace/";
  return el("a", { id: "trace-link", href: base + traceId, target: "_blank", rel: "noopener" }, traceId);
}

async function inspect(conversationId, scroll = true) {
  inspected = conversationId;
  $("#inspect-conversation").value = conversationId;
  const out = $("#inspect-result");
  let x;
  try {
    x = await op("explainConversation", { conversationId });
  } catch (e) {
    out.replaceChildren(el("p", { class: "error" }, e.message));
    return;
  }
  const m = x.message;
  const w = x.worker;
  const s = x.lastSnapshot;
  const facts = [
    ["message", m ? m._id + " (" + m.status + ")" : "—"],
    ["attempts", m ? m.attempts + " of " + m.maxAttempts : "—"],
    ["last error", (m && m.lastError) || "—"],
    ["due", m ? when(m.scheduledFor) : "—"],
    ["lease holder", x.lease ? x.lease.workerId + ", expires " + ago(x.lease.expiresAt, x.now) : "nobody"],
    ["worker", w ? w.workerId + " — " + w.status + ", heartbeat " + ago(w.heartbeatAt, x.now) : "none serves this conversation"],
    ["machine", w ? machineOf(w) : "—"],
    ["idle deadline", w && w.scheduledShutdownAt ? ago(w.scheduledShutdownAt, x.now) : "—"],
    ["last snapshot", s ? s.snapshotId + " (" + s.status + ", " + ago(s.createdAt, x.now) + ")" : "none"],
    ["trace", x.traceId ? traceLink(x.traceId) : "—"],
    ["unanswered", String(x.unanswered)],
  ];
  out.replaceChildren(
    el("div", { class: "verdict " + x.verdict, id: "verdict", "data-verdict": x.verdict },
      el("strong", {}, x.verdict.replace(/_/g, " ")), el("span", { id: "verdict-reason" }, x.reason)),
    el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
  );
  if (scroll) $("#inspect").scrollIntoView({ behavior: "smooth" });
}

async function loadAgents() {
  const agents = await op("listAgentProfiles");
  loadAgents.refs = [...new Set(agents.flatMap((a) => a.secretsRef || []))];
  fill($("#agents-table tbody"), agents.map((a) => el("tr", { "data-agent": a.agentKey },
    el("td", {}, a.agentKey),
    el("td", {}, a.version),
    el("td", {}, (a.secretsRef || []).join(", ") || "—"),
    el("td", {}, a.botIdentity || "—"),
    el("td", {}, a.enabled ? "yes" : "no"),
  )), 5);
}

async function loadSecrets(refs) {
  refs = refs && refs.length ? refs : [...new Set(["convex.url", ...(loadAgents.refs || [])])];
  const status = await op("getSecretsStatus", { secretRefs: refs });
  fill($("#secrets-table tbody"), status.map((s) => el("tr", { "data-secret": s.secretRef, "data-active": String(s.hasActive) },
    el("td", { class: "mono" }, s.secretRef),
    el("td", {}, s.hasActive ? el("span", { class: "pill" }, "ok v" + s.version) : el("span", { class: "pill bad" }, "missing")),
  )), 2);
}

async function loadProvider() {
  const cfg = await op("providerRuntimeConfig");
  $("#provider-summary").textContent = cfg ? [cfg.kind, cfg.appName, cfg.region].filter(Boolean).join(" | ") || "set" : "not set";
  for (const field of $("#provider-form").elements) {
    if (field.name && cfg && cfg[field.name] !== undefined && cfg[field.name] !== null) field.value = cfg[field.name];
  }
}

async function loadSkills() {
  const skills = await op("listGlobalSkills", { limit: 50 });
  fill($("#skills-table tbody"), skills.map((s) => el("tr", {},
    el("td", {}, s.slug),
    el("td", {}, s.status),
    el("td", {}, s.activeRelease ? s.activeRelease.version : "—"),
    el("td", {},
      el("button", { class: "small secondary", onclick: () => act("Skill status", () => op("setGlobalSkillStatus", { slug: s.slug, status: s.status === "active" ? "disabled" : "active" })).then(loadSkills) }, s.status === "active" ? "Disable" : "Enable"), " ",
      el("button", { class: "small danger", onclick: () => confirm("Delete skill " + s.slug + "?") && act("Delete skill", () => op("deleteGlobalSkill", { slug: s.slug })).then(loadSkills) }, "Delete")),
  )), 4);
}

// The pairing wizard shows the newest code of the user and agent it generated one for; pairing
// changes arrive as events, so "used" appears as soon as the user sends /start <code>.
let pairingFor = null;
async function loadPairing() {
  if (!pairingFor) return;
  const p = await op("getUserAgentPairingStatus", pairingFor);
  const out = $("#pairing-result");
  if (!p) { out.replaceChildren(el("p", { class: "hint" }, "no pairing code")); return; }
  const cls = p.status === "used" ? "" : p.status === "pending" ? "info" : "bad";
  out.replaceChildren(el("dl", { class: "facts" },
    el("dt", {}, "code"), el("dd", { class: "code", id: "pairing-code" }, p.code),
    el("dt", {}, "status"), el("dd", {}, el("span", { class: "pill " + cls, id: "pairing-status", "data-status": p.status }, p.status)),
    el("dt", {}, "deep link"), el("dd", {}, pairingFor.deepLink ? el("a", { href: pairingFor.deepLink }, pairingFor.deepLink) : "— (known once the agent's bot token is imported and verified: importTelegramTokenForAgent)"),
    el("dt", {}, "expires"), el("dd", {}, when(p.expiresAt)),
    el("dt", {}, "telegram"), el("dd", {}, p.telegramUserId ? "user " + p.telegramUserId + ", chat " + (p.telegramChatId || "—") : "—"),
  ));
}

async function sha256Hex(text) {
  if (!crypto.subtle) throw new Error("the browser offers SHA-256 only on https or localhost");
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- wiring ----------------------------------------------------------------------------

function onSubmit(id, what, handler) {
  $(id).addEventListener("submit", (e) => {
    e.preventDefault();
    act(what, () => handler(formValues(e.target), e.target));
  });
}

function wire() {
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await fetch("/console/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("#login-token").value.trim() }),
    });
    const body = await res.json().catch(() => null);
    $("#login-token").value = "";
    if (!res.ok) { $("#login-error").textContent = (body && body.error && body.error.message) || "login failed"; return; }
    startApp(body);
  });
  $("#logout").addEventListener("click", async () => {
    await fetch("/console/logout", { method: "POST", credentials: "same-origin", headers: { "X-AF-CSRF": csrf || "" } });
    showLogin("Logged out.");
  });

  onSubmit("#enqueue-form", "Enqueue", (v) => op("enqueueMessage", {
    conversationId: v.conversationId, agentKey: v.agentKey,
    payload: { provider: "console", providerUserId: v.providerUserId, messageText: v.messageText },
  }));
  $("#inspect-form").addEventListener("submit", (e) => { e.preventDefault(); inspect($("#inspect-conversation").value.trim()); });
  $("#trace-base").value = localStorage.getItem("af.traceBase") || "";
  $("#trace-base").addEventListener("change", (e) => { localStorage.setItem("af.traceBase", e.target.value.trim()); reinspect(); });

  onSubmit("#agent-form", "Save agent", async (v) => {
    await op("upsertAgentProfile", {
      agentKey: v.agentKey, version: v.version, enabled: v.enabled,
      secretsRef: v.secretsRef ? v.secretsRef.split(",").map((s) => s.trim()).filter(Boolean) : [],
    });
    await loadAgents();
    await loadSecrets();
  });
  onSubmit("#secrets-status-form", "Check secrets", (v) => loadSecrets(v.refs.split(",").map((s) => s.trim()).filter(Boolean)));
  onSubmit("#secret-form", "Import secret", async (v, form) => {
    await op("importPlaintextSecret", { secretRef: v.secretRef, plaintextValue: v.plaintextValue });
    form.elements.plaintextValue.value = "";
    await loadSecrets([...new Set([v.secretRef, "convex.url", ...(loadAgents.refs || [])])]);
  });
  onSubmit("#provider-form", "Save provider config", async (v) => {
    const cfg = {};
    for (const [k, val] of Object.entries(v)) if (val !== "") cfg[k] = k === "volumeSizeGb" ? Number(val) : val;
    await op("setProviderRuntimeConfig", { providerConfig: cfg });
    await loadProvider();
  });
  onSubmit("#bind-form", "Bind user", (v) => op("bindUserAgent", {
    consumerUserId: v.consumerUserId, agentKey: v.agentKey, source: "manual",
    telegramUserId: v.telegramUserId || undefined, telegramChatId: v.telegramChatId || undefined,
  }));
  onSubmit("#pairing-form", "Pairing code", async (v) => {
    const created = await op("createUserAgentPairing", { consumerUserId: v.consumerUserId, agentKey: v.agentKey });
    pairingFor = { consumerUserId: v.consumerUserId, agentKey: v.agentKey };
    Object.defineProperty(pairingFor, "deepLink", { value: created.deepLink, enumerable: false });
    await loadPairing();
  });

  const poolResult = (r) => { $("#pool-result").textContent = JSON.stringify(r, null, 2); };
  $("#reconcile").addEventListener("click", () => act("Reconcile", () => op("reconcileWorkerPool", {}).then(poolResult)));
  $("#idle-check").addEventListener("click", () => act("Idle check", () => op("checkIdleShutdowns", {}).then(poolResult)));
  $("#release").addEventListener("click", () => act("Lease recovery", () => op("releaseStuckJobs", {}).then(poolResult)));
  onSubmit("#volume-form", "Delete volume", (v) => confirm("Delete volume " + v.volumeId + "?") && op("deleteFlyVolume", v).then(poolResult));

  const pushResult = (r) => { $("#push-result").textContent = JSON.stringify(r, null, 2); };
  onSubmit("#push-form", "Push job", (v) => op("createPushJobCustom", {
    companyId: v.companyId, consumerUserId: v.consumerUserId, title: v.title, text: v.text,
    periodicity: "daily", timezone: v.timezone, schedule: { kind: "daily", time: v.time },
  }).then((id) => pushResult({ pushJobId: id })));
  $("#dispatch-due").addEventListener("click", () => act("Dispatch", () => op("dispatchDuePushJobs", {}).then(pushResult)));
  onSubmit("#broadcast-form", "Broadcast", (v) => op("sendBroadcastToAllActiveAgents", { ...v, requestedBy: "console" }).then(pushResult));

  onSubmit("#skill-form", "Deploy skill", async (v) => {
    const files = [
      { path: "SKILL.md", content: v.skillMd },
      { path: "scripts/index.mjs", content: "export default async function run() {\n  return \"ok\";\n}\n" },
    ];
    for (const f of files) f.sha256 = await sha256Hex(f.content);
    await op("deployGlobalSkill", { slug: v.slug, version: v.version, description: v.description || undefined, files });
    await loadSkills();
  });

  const webhookResult = (r) => { $("#webhook-result").textContent = JSON.stringify(r, null, 2); };
  onSubmit("#webhook-form", "Configure webhook", (v) => op("configureTelegramWebhook", { agentKey: v.agentKey }).then(webhookResult));
  $("#webhook-check").addEventListener("click", () => {
    const agentKey = $("#webhook-form").elements.agentKey.value.trim();
    act("Webhook readiness", () => op("getWebhookReadiness", { agentKey }).then(webhookResult));
  });

  // Highlight the tab of the panel in view.
  const links = [...document.querySelectorAll("#tabs a")];
  window.addEventListener("hashchange", () => links.forEach((a) => a.classList.toggle("active", a.hash === location.hash)));
}

async function boot() {
  wire();
  const res = await fetch("/console/session", { credentials: "same-origin" });
  if (res.ok) startApp(await res.json());
  else showLogin();
}

document.addEventListener("DOMContentLoaded", boot);
