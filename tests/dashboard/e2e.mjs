// End-to-end test of the operator dashboard in headless Chromium, driven by the Rust test
// `tests/tests/dashboard.rs`, which starts the gateway, seeds data and passes:
//   ADMIN_URL, TOKEN, EXPECTED_REQUESTS, EXPECTED_TOKENS, EXPECTED_BATCH_REQUESTS,
//   TENANT_ID, KEY_ID, BATCH_ID, PERIOD,
//   DOWNLOAD_DIR, SCREENSHOT_DIR (optional: where to save screenshots).
// Prints one JSON line with what it saw; exits non-zero on any failed expectation.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import path from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const base = env("ADMIN_URL");
const shots = process.env.SCREENSHOT_DIR;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const result = {};
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 }, acceptDownloads: true });
  const page = await context.newPage();
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(base)) external.push(r.url()); });
  const consoleErrors = [];
  // Refused requests (the wrong token below) are logged by the browser itself; anything
  // else is a script error.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  // A wrong token is refused with a message.
  await page.goto(base + "/");
  await page.fill("#token", "not-a-token");
  await page.click("#sign-in-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#sign-in-error").textContent.length > 0);
  result.bad_token_message = await page.textContent("#sign-in-error");

  // Sign in; time from a fresh page load to every panel drawn (printed, not asserted).
  await page.fill("#token", env("TOKEN"));
  await page.click("#sign-in-form button[type=submit]");
  await page.waitForSelector("body[data-loaded=true]", { timeout: 15000 });
  const started = Date.now();
  await page.reload();
  await page.waitForSelector("body[data-loaded=true]", { timeout: 15000 });
  result.load_ms = Date.now() - started;
  const transferred = await page.evaluate(() =>
    performance.getEntriesByType("resource").concat(performance.getEntriesByType("navigation"))
      .reduce((a, e) => a + (e.transferSize || 0), 0));
  result.page_bytes = transferred;
  await page.selectOption("#range", "90");
  await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Updated"));

  // The chart's total and the headline figure match the seeded records.
  const chartTotal = await page.getAttribute("#chart-requests svg", "data-total");
  const bars = await page.locator("#chart-requests svg rect.bar").count();
  const kpi = await page.textContent("#kpi-requests");
  const tokensTotal = await page.getAttribute("#chart-tokens svg", "data-total");
  result.chart_requests_total = Number(chartTotal);
  result.chart_bars = bars;
  result.kpi_requests = kpi;
  assert.equal(Number(chartTotal), Number(env("EXPECTED_REQUESTS")), "requests chart total");
  assert.equal(kpi, Number(env("EXPECTED_REQUESTS")).toLocaleString("en-US"), "requests headline");
  assert.equal(Number(tokensTotal), Number(env("EXPECTED_TOKENS")), "tokens chart total");
  assert.ok(bars >= 2, "bars drawn");
  // Batch lines are split out: stacked on the requests chart and counted on their own.
  result.chart_batch_requests = Number(await page.getAttribute("#chart-requests svg", "data-second"));
  assert.equal(result.chart_batch_requests, Number(env("EXPECTED_BATCH_REQUESTS")), "batch requests on the chart");
  assert.equal(await page.textContent("#kpi-batch"), Number(env("EXPECTED_BATCH_REQUESTS")).toLocaleString("en-US"), "batch headline");
  assert.ok(await page.locator("#top-tenant svg rect.bar").count() >= 2, "top tenants chart");
  assert.ok(await page.locator("#workers-table tbody tr").count() >= 1, "worker pool listed");
  assert.match(await page.textContent("#workers-table tbody"), /healthy/);
  if (shots) await page.screenshot({ path: path.join(shots, "dashboard-overview.png"), fullPage: true });

  // Revoke a key.
  await page.selectOption("#keys-tenant", env("TENANT_ID"));
  const row = page.locator(`#keys-table tr[data-key="${env("KEY_ID")}"]`);
  await row.waitFor();
  page.once("dialog", (d) => d.accept());
  await row.locator("button", { hasText: "Revoke" }).click();
  await page.waitForFunction((id) => {
    const r = document.querySelector(`#keys-table tr[data-key="${id}"]`);
    return r && r.textContent.includes("revoked");
  }, env("KEY_ID"));
  result.revoked = env("KEY_ID");
  // The tenant's batches, with their progress.
  await page.locator(`#batches-table tr[data-batch="${env("BATCH_ID")}"]`).waitFor();
  assert.match(await page.textContent(`#batches-table tr[data-batch="${env("BATCH_ID")}"]`), /\/v1\/embeddings.*\d+ \/ 1/);
  if (shots) await page.locator("#keys").screenshot({ path: path.join(shots, "dashboard-keys.png") });

  // Download an export of the seeded month.
  await page.selectOption("#invoices-tenant", env("TENANT_ID"));
  await page.fill("#export-period", env("PERIOD"));
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export-csv")]);
  const saved = path.join(env("DOWNLOAD_DIR"), download.suggestedFilename());
  await download.saveAs(saved);
  result.download = saved;
  await page.waitForFunction(() => document.querySelector("#export-status").textContent.startsWith("Downloaded"));
  // Invoices are listed with their download buttons.
  assert.ok(await page.locator("#invoices-table tbody tr").count() >= 1, "invoices listed");
  if (shots) await page.locator("#invoices").screenshot({ path: path.join(shots, "dashboard-invoices.png") });

  assert.deepEqual(external, [], "no request left the gateway (works offline)");
  assert.deepEqual(consoleErrors, [], "no console errors");
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
