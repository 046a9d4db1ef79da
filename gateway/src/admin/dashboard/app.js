// Operator and finance dashboard: plain JavaScript, no libraries, no network but this
// gateway's admin API. Charts are drawn as SVG here.
"use strict";

const state = { token: sessionStorage.getItem("adminToken") || "", who: null, tenants: [], currency: "USD" };
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svgEl(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + state.token }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) {
    signOut("Your token was refused or has expired; sign in again.");
    throw new Error("unauthorized");
  }
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try { message = (await res.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}
const getJson = async (path) => (await api(path)).json();

const fmt = (n) => Number(n).toLocaleString("en-US");
// Money arrives exact, in millionths of a minor unit; shown in major units (2 decimals).
const money = (micros) => (micros / 1e8).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 }) + " " + state.currency;
const can = (p) => state.who && state.who.permissions.includes(p);
const secs = (s) => (s == null ? "–" : s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s");

function bucketLabel(ms, bucket) {
  const d = new Date(ms);
  const day = d.toISOString().slice(5, 10);
  return bucket === "hour" ? day + " " + d.toISOString().slice(11, 13) + "h" : day;
}

// Vertical bars; `series` is one or two arrays of values stacked per label.
function barChart(container, labels, series, opts = {}) {
  container.replaceChildren();
  const total = series.reduce((a, s) => a + s.reduce((x, y) => x + y, 0), 0);
  container.dataset.total = String(total);
  const second = series.length > 1 ? series[1].reduce((x, y) => x + y, 0) : 0;
  if (labels.length === 0) { container.append(el("div", { class: "empty" }, "No data in this range.")); return; }
  const W = 480, H = 180, L = opts.format ? 70 : 48, B = 22, T = 8;
  const sums = labels.map((_, i) => series.reduce((a, s) => a + s[i], 0));
  const max = Math.max(1, ...sums);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-total": total, "data-second": second, "aria-label": (opts.title || "chart") + ", total " + total });
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    const y = H - B - f * (H - B - T);
    const tick = opts.tick || opts.format;
    svg.append(svgEl("text", { class: "tick", x: L - 4, y: y + 3, "text-anchor": "end" }, tick ? tick(max * f) : fmt(Math.round(max * f))));
  }
  const w = (W - L) / labels.length;
  labels.forEach((label, i) => {
    let y = H - B;
    series.forEach((s, k) => {
      const h = (s[i] / max) * (H - B - T);
      y -= h;
      const bw = Math.max(1, Math.min(w * 0.8, 36));
      const r = svgEl("rect", { class: "bar" + (k === 1 ? " second" : ""), x: L + i * w + (w - bw) / 2, y, width: bw, height: h });
      r.append(svgEl("title", {}, label + ": " + (opts.format ? opts.format(s[i]) : fmt(s[i]))));
      svg.append(r);
    });
    const every = Math.ceil(labels.length / 8);
    if (i % every === 0) svg.append(svgEl("text", { class: "tick", x: L + i * w + w / 2, y: H - 6, "text-anchor": "middle" }, label));
  });
  container.append(svg);
}

// Lines over epochs: one polyline per series, sharing the y scale.
function lineChart(container, series, opts = {}) {
  container.replaceChildren();
  const n = Math.max(0, ...series.map((s) => s.length));
  container.dataset.points = String(n);
  if (n === 0) { container.append(el("div", { class: "empty" }, opts.empty || "No data.")); return; }
  const W = 480, H = 180, L = 48, B = 22, T = 8;
  const max = Math.max(1e-9, ...series.flat());
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    svg.append(svgEl("text", { class: "tick", x: L - 4, y: H - B - f * (H - B - T) + 3, "text-anchor": "end" }, (max * f).toFixed(2)));
  }
  const x = (i) => L + (n === 1 ? 0 : (i / (n - 1)) * (W - L - 4));
  series.forEach((s, k) => {
    const points = s.map((v, i) => `${x(i).toFixed(1)},${(H - B - (v / max) * (H - B - T)).toFixed(1)}`).join(" ");
    svg.append(svgEl("polyline", { class: "line" + (k === 1 ? " second" : ""), points, fill: "none" }));
  });
  svg.append(svgEl("text", { class: "tick", x: W - 4, y: H - 6, "text-anchor": "end" }, "epoch " + n));
  container.append(svg);
}

// Horizontal bars for leader boards.
function hbarChart(container, rows, format) {
  container.replaceChildren();
  const total = rows.reduce((a, r) => a + r.value, 0);
  container.dataset.total = String(total);
  if (rows.length === 0) { container.append(el("div", { class: "empty" }, "No data in this range.")); return; }
  const W = 480, row = 22, H = rows.length * row + 4, L = 170;
  const max = Math.max(1, ...rows.map((r) => r.value));
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-total": total });
  rows.forEach((r, i) => {
    const y = 2 + i * row;
    svg.append(svgEl("text", { class: "label-text", x: L - 6, y: y + 14, "text-anchor": "end" }, r.label.length > 26 ? r.label.slice(0, 25) + "…" : r.label));
    const w = Math.max(1, (r.value / max) * (W - L - 90));
    const rect = svgEl("rect", { class: "bar" + (r.bad ? " bad" : ""), x: L, y: y + 3, width: w, height: row - 8 });
    rect.append(svgEl("title", {}, r.label + ": " + format(r.value)));
    svg.append(rect);
    svg.append(svgEl("text", { class: "tick", x: L + w + 4, y: y + 14 }, format(r.value)));
  });
  container.append(svg);
}

function range() {
  const days = Number($("range").value);
  const to = Math.floor(Date.now() / 1000) + 1;
  return { from: to - days * 86400, to };
}

async function loadUsage() {
  const { from, to } = range();
  const bucket = $("bucket").value;
  const q = new URLSearchParams({ from, to, bucket });
  const tenant = $("tenant-filter").value;
  if (tenant) q.set("tenant", tenant);
  const qb = new URLSearchParams(q);
  qb.set("group_by", "batch");
  const [s, split] = await Promise.all([getJson("/admin/v1/usage?" + q), getJson("/admin/v1/usage?" + qb)]);
  const t = s.totals;
  // Batch lines per bucket; the rest of each bucket is interactive.
  const batchAt = new Map(split.data.filter((p) => p.group === "batch").map((p) => [p.start_ms, p]));
  const batch = (p, field) => (batchAt.get(p.start_ms) || {})[field] || 0;
  const bt = { requests: 0, spend_micros: 0 };
  for (const p of batchAt.values()) { bt.requests += p.requests; bt.spend_micros += p.spend_micros; }
  $("kpi-batch").textContent = fmt(bt.requests);
  $("kpi-batch").dataset.value = bt.requests;
  $("kpi-batch").title = money(bt.spend_micros) + " of spend, at the batch discount";
  $("kpi-requests").textContent = fmt(t.requests);
  $("kpi-requests").dataset.value = t.requests;
  $("kpi-tokens").textContent = fmt(t.prompt_tokens + t.completion_tokens);
  $("kpi-tokens").dataset.value = t.prompt_tokens + t.completion_tokens;
  $("kpi-cached").textContent = fmt(t.cached_tokens);
  $("kpi-cached").dataset.value = t.cached_tokens;
  $("kpi-hits").textContent = fmt(t.cache_hits);
  $("kpi-hits").dataset.value = t.cache_hits;
  $("kpi-spend").textContent = money(t.spend_micros);
  $("kpi-spend").dataset.value = t.spend_micros;
  $("kpi-unbilled").textContent = fmt(t.unbilled_requests);
  const labels = s.data.map((p) => bucketLabel(p.start_ms, bucket));
  barChart($("chart-requests"), labels, [s.data.map((p) => p.requests - batch(p, "requests")), s.data.map((p) => batch(p, "requests"))],
    { title: "requests" });
  barChart($("chart-tokens"), labels, [s.data.map((p) => p.prompt_tokens), s.data.map((p) => p.completion_tokens)], { title: "tokens" });
  barChart($("chart-spend"), labels, [s.data.map((p) => p.spend_micros - batch(p, "spend_micros")), s.data.map((p) => batch(p, "spend_micros"))],
    { title: "spend", format: money, tick: (v) => (v / 1e8).toLocaleString("en-US", { maximumSignificantDigits: 3 }) });
}

async function loadTop() {
  const { from, to } = range();
  const tenant = $("tenant-filter").value;
  await Promise.all(["tenant", "key", "model"].map(async (by) => {
    const q = new URLSearchParams({ by, from, to, limit: 8 });
    if (tenant) q.set("tenant", tenant);
    const top = await getJson("/admin/v1/usage/top?" + q);
    const rows = top.data.map((e) => ({ label: e.name ? e.name + " (…" + e.id.slice(-6) + ")" : e.id, value: e.spend_micros > 0 ? e.spend_micros : e.prompt_tokens + e.completion_tokens, spend: e.spend_micros > 0 }));
    const anySpend = rows.some((r) => r.spend);
    hbarChart($("top-" + by), rows, anySpend ? money : (v) => fmt(v) + " tok");
  }));
}

async function loadOperations() {
  const [traffic, workers] = await Promise.all([getJson("/admin/v1/traffic"), getJson("/admin/v1/workers")]);
  const routes = traffic.data.filter((r) => r.requests > 0);
  const tbody = $("traffic-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const r of routes) {
    const tr = el("tr");
    tr.append(el("td", {}, r.route), el("td", { class: "num" }, fmt(r.requests)), el("td", { class: "num" }, fmt(r.client_errors)),
      el("td", { class: "num" }, fmt(r.server_errors)), el("td", { class: "num" }, secs(r.p50_seconds)),
      el("td", { class: "num" }, secs(r.p90_seconds)), el("td", { class: "num" }, secs(r.p99_seconds)));
    tbody.append(tr);
  }
  barChart($("chart-latency"), routes.map((r) => r.route.replace("/v1/", "")),
    [routes.map((r) => (r.p50_seconds || 0) * 1000), routes.map((r) => Math.max(0, ((r.p99_seconds || 0) - (r.p50_seconds || 0)) * 1000))],
    { title: "latency ms", format: (v) => v.toFixed(1) + " ms" });
  hbarChart($("chart-errors"), routes.map((r) => ({ label: r.route, value: (r.client_errors + r.server_errors) / r.requests, bad: r.server_errors > 0 })),
    (v) => (v * 100).toFixed(1) + " %");
  const rc = traffic.response_cache;
  if (rc) {
    const lookups = rc.hits + rc.misses;
    $("rc-rate").textContent = lookups ? ((rc.hits / lookups) * 100).toFixed(1) + " %" : "–";
    $("rc-rate").dataset.value = lookups ? rc.hits / lookups : 0;
    $("rc-lookups").textContent = fmt(rc.hits) + " / " + fmt(rc.misses);
    $("rc-bytes").textContent = (rc.bytes / 1048576).toFixed(1) + " of " + (rc.max_bytes / 1048576).toFixed(0) + " MiB" + (rc.shared_tier ? " + Redis" : "");
    $("rc-bytes").dataset.value = rc.bytes;
    $("rc-entries").textContent = fmt(rc.entries);
  } else {
    $("rc-rate").textContent = "off";
  }
  const wbody = $("workers-table").querySelector("tbody");
  wbody.replaceChildren();
  for (const w of workers.data) {
    const tr = el("tr");
    tr.append(el("td", {}, w.url), el("td", { class: w.healthy ? "ok" : "down" }, w.healthy ? "healthy" : "down"),
      el("td", { class: "num" }, fmt(w.outstanding_requests)), el("td", {}, w.models.join(", ")));
    wbody.append(tr);
  }
}

function fillTenantSelects() {
  for (const id of ["tenant-filter", "keys-tenant", "invoices-tenant"]) {
    const sel = $(id);
    const keep = sel.value;
    const first = id === "tenant-filter" ? [el("option", { value: "" }, "all tenants")] : [];
    sel.replaceChildren(...first, ...state.tenants.map((t) => el("option", { value: t.id }, t.name)));
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
}

async function loadKeys() {
  const tenant = $("keys-tenant").value;
  const tbody = $("keys-table").querySelector("tbody");
  tbody.replaceChildren();
  if (!tenant) return;
  const keys = await getJson("/admin/v1/tenants/" + encodeURIComponent(tenant) + "/keys");
  const now = Date.now();
  for (const k of keys.data) {
    const tr = el("tr", { "data-key": k.id });
    const live = k.revoked_at == null && (k.expires_at == null || k.expires_at > now);
    const stateText = k.revoked_at != null ? "revoked" : live ? "active" : "expired";
    tr.append(el("td", {}, k.id), el("td", {}, k.name), el("td", {}, k.allowed_models ? k.allowed_models.join(", ") : "all"),
      el("td", {}, new Date(k.created_at).toISOString().slice(0, 16).replace("T", " ")), el("td", { class: live ? "ok" : "down" }, stateText));
    const actions = el("td");
    if (live && can("manage_keys")) {
      const b = el("button", { type: "button", class: "danger" }, "Revoke");
      b.addEventListener("click", async () => {
        if (!confirm("Revoke key " + k.id + "? Calls with it will be refused within a second.")) return;
        b.disabled = true;
        try { await api("/admin/v1/tenants/" + encodeURIComponent(tenant) + "/keys/" + encodeURIComponent(k.id) + "/revoke", { method: "POST" }); }
        catch (e) { setStatus(e.message); }
        await loadKeys();
      });
      actions.append(b);
    }
    tr.append(actions);
    tbody.append(tr);
  }
}

async function loadClassifiers() {
  const tenant = $("keys-tenant").value;
  const tbody = $("classifiers-table").querySelector("tbody");
  tbody.replaceChildren();
  lineChart($("chart-loss"), [], { empty: "Choose a trained classifier." });
  if (!tenant) return;
  const list = await getJson("/admin/v1/tenants/" + encodeURIComponent(tenant) + "/classifiers");
  const show = (c) => {
    const curve = (c.metrics && c.metrics.loss_curve) || [];
    $("loss-caption").textContent = "Loss per epoch of " + c.name + " (training / validation)";
    lineChart($("chart-loss"), [curve.map((e) => e.train_loss), curve.map((e) => e.validation_loss)], { title: "loss of " + c.name });
  };
  for (const c of list.data) {
    const m = c.metrics;
    const status = c.status === "training" && c.progress ? `training (${c.progress.phase} ${c.progress.done}/${c.progress.total})` : c.status;
    const tr = el("tr", { "data-classifier": c.id });
    tr.append(el("td", {}, c.id), el("td", {}, c.name), el("td", {}, c.model), el("td", {}, c.labels.join(", ")),
      el("td", { class: c.status === "failed" ? "down" : c.status === "ready" ? "ok" : "" }, status),
      el("td", { class: "num" }, m ? m.accuracy.toFixed(3) : "–"), el("td", { class: "num" }, m ? m.macro_f1.toFixed(3) : "–"),
      el("td", { class: "num" }, fmt(c.examples)), el("td", { class: "num" }, fmt(c.tokens)));
    tr.addEventListener("click", () => show(c));
    tbody.append(tr);
  }
  const first = list.data.find((c) => c.metrics);
  if (first) show(first);
}

async function loadBatches() {
  const tenant = $("keys-tenant").value;
  const tbody = $("batches-table").querySelector("tbody");
  tbody.replaceChildren();
  if (!tenant) return;
  const list = await getJson("/admin/v1/tenants/" + encodeURIComponent(tenant) + "/batches");
  for (const b of list.data) {
    const c = b.request_counts;
    const ended = ["completed", "cancelled", "expired"].includes(b.status);
    const tr = el("tr", { "data-batch": b.id });
    tr.append(el("td", {}, b.id), el("td", {}, b.endpoint),
      el("td", { class: b.status === "failed" ? "down" : ended ? "ok" : "" }, b.status),
      el("td", { class: "num" }, `${fmt(c.completed + c.failed)} / ${fmt(c.total)}`),
      el("td", { class: "num" }, fmt(c.failed)),
      el("td", {}, new Date(b.created_at * 1000).toISOString().slice(0, 16).replace("T", " ")));
    tbody.append(tr);
  }
}

async function download(path, fallbackName) {
  const res = await api(path);
  const cd = res.headers.get("content-disposition") || "";
  const m = /filename="([^"]+)"/.exec(cd);
  const blob = await res.blob();
  const a = el("a", { href: URL.createObjectURL(blob), download: m ? m[1] : fallbackName });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  return blob.size;
}

async function loadInvoices() {
  const tenant = $("invoices-tenant").value;
  const tbody = $("invoices-table").querySelector("tbody");
  tbody.replaceChildren();
  if (!tenant) return;
  const list = await getJson("/admin/v1/tenants/" + encodeURIComponent(tenant) + "/invoices");
  if (list.data.length === 0) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "4", class: "muted" }, "No finalised invoices yet."));
    tbody.append(tr);
  }
  for (const inv of list.data) {
    const tr = el("tr");
    const dl = el("td");
    for (const f of ["json", "csv"]) {
      const b = el("button", { type: "button" }, f.toUpperCase());
      b.addEventListener("click", () => download(`/admin/v1/tenants/${encodeURIComponent(tenant)}/invoices/${encodeURIComponent(inv.id)}?format=${f}`, inv.id + "." + f).catch((e) => setStatus(e.message)));
      dl.append(b, document.createTextNode(" "));
    }
    tr.append(el("td", {}, inv.id), el("td", {}, inv.period), el("td", { class: "num" }, (inv.total_minor / 100).toFixed(2) + " " + state.currency), dl);
    tbody.append(tr);
  }
}

async function exportUsage(format) {
  const period = $("export-period").value;
  if (!/^\d{4}-\d{2}$/.test(period)) { $("export-status").textContent = "Choose a month."; return; }
  const q = new URLSearchParams({ period, format });
  const tenant = $("invoices-tenant").value;
  if (tenant) q.set("tenant", tenant);
  $("export-status").textContent = "Exporting…";
  try {
    const bytes = await download("/admin/v1/exports/usage?" + q, `usage-${period}.${format}`);
    $("export-status").textContent = "Downloaded " + fmt(bytes) + " bytes.";
  } catch (e) { $("export-status").textContent = e.message; }
}

function setStatus(text) { $("status").textContent = text; }

async function refresh() {
  setStatus("Loading…");
  const jobs = [];
  if (can("read_directory")) {
    state.tenants = (await getJson("/admin/v1/tenants")).data;
    const prices = (await getJson("/admin/v1/prices")).data;
    if (prices.length) state.currency = prices[prices.length - 1].currency;
    fillTenantSelects();
    jobs.push(loadKeys(), loadClassifiers(), loadBatches());
    if (can("read_invoices")) jobs.push(loadInvoices());
  }
  if (can("read_usage")) jobs.push(loadUsage(), loadTop());
  if (can("read_operations")) jobs.push(loadOperations());
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected");
  setStatus(failed.length ? "Some panels failed: " + failed[0].reason.message : "Updated " + new Date().toLocaleTimeString());
  document.body.dataset.loaded = "true";
}

function showApp() {
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("who-text").textContent = state.who.sub + " · " + state.who.role;
  for (const s of document.querySelectorAll("[data-needs]")) s.hidden = !can(s.dataset.needs);
  const now = new Date();
  const last = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - 1, 1));
  $("export-period").value = last.toISOString().slice(0, 7);
  refresh().catch((e) => setStatus(e.message));
}

function signOut(message) {
  state.token = "";
  state.who = null;
  sessionStorage.removeItem("adminToken");
  $("app").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
}

async function signIn(token) {
  state.token = token.trim();
  const res = await fetch("/admin/v1/whoami", { headers: { Authorization: "Bearer " + state.token } });
  if (!res.ok) {
    let message = "Sign-in failed (" + res.status + ")";
    try { message = (await res.json()).error.message; } catch (_) { /* keep */ }
    signOut(message);
    return;
  }
  state.who = await res.json();
  sessionStorage.setItem("adminToken", state.token);
  showApp();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value); });
  $("sign-out").addEventListener("click", () => signOut());
  $("refresh").addEventListener("click", () => refresh().catch((e) => setStatus(e.message)));
  for (const id of ["range", "bucket", "tenant-filter"]) $(id).addEventListener("change", () => refresh().catch((e) => setStatus(e.message)));
  $("keys-tenant").addEventListener("change", () => Promise.all([loadKeys(), loadClassifiers(), loadBatches()]).catch((e) => setStatus(e.message)));
  $("invoices-tenant").addEventListener("change", () => loadInvoices().catch((e) => setStatus(e.message)));
  $("export-csv").addEventListener("click", () => exportUsage("csv"));
  $("export-json").addEventListener("click", () => exportUsage("json"));
  if (state.token) signIn(state.token);
});
