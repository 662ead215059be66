// The dashboard end to end in headless Chromium: `apikeys serve` on an SQLite file, driven by
// playwright-core, every page checked by axe-core, screenshots of each page in light and dark, on
// a laptop and a phone. `tests/browser.rs` runs it; by hand:
//
//   APIKEYS_BIN=target/debug/apikeys node tests/browser/dashboard.mjs
//
// Exits non-zero on the first failed check.

import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.APIKEYS_BIN;
const chromiumPath = process.env.APIKEYS_CHROMIUM || "/usr/bin/chromium";
const shots = process.env.APIKEYS_SCREENSHOTS || join(here, "..", "..", "artifacts", "dashboard-screenshots");
const adminToken = "admin-token-of-the-browser-test-0123456789abcdef";
assert.ok(bin, "set APIKEYS_BIN to the apikeys binary");
mkdirSync(shots, { recursive: true });

/** A port nobody listens on now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** `apikeys serve` on a fresh SQLite file; resolves once it answers, with its first key. */
async function serve(env) {
  const dir = mkdtempSync(join(tmpdir(), "apikeys-browser-"));
  const port = await freePort();
  const child = spawn(bin, ["--db", join(dir, "keys.db"), "serve", "--listen", `127.0.0.1:${port}`], {
    env: Object.fromEntries(Object.entries({ ...process.env, APIKEYS_LOG: "info", ...env }).filter(([, value]) => value !== undefined)),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk) => (stdout += chunk));
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const base = `http://127.0.0.1:${port}`;
  for (let attempt = 0; attempt < 200; attempt++) {
    try {
      if ((await fetch(`${base}/openapi.json`)).ok) break;
    } catch {}
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const firstKey = stdout.match(/as_live_v1_[A-Za-z0-9_]+/)?.[0];
  assert.ok(firstKey, `serve printed a first key:\n${stdout}\n${stderr}`);
  return { base, child, firstKey, logs: () => stdout + stderr };
}

/** `curl` with the key, as a client of the API would: the status it got. */
function curl(base, key) {
  const status = execFileSync("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", `${base}/account/api-keys`, "-H", `x-api-key: ${key}`]);
  return Number(status.toString());
}

/** No serious or critical accessibility violation on the page, by axe-core. */
async function checkAccessibility(page, name) {
  await page.addScriptTag({ content: axeSource });
  const results = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const serious = results.violations.filter((violation) => ["serious", "critical"].includes(violation.impact));
  const summary = serious.map((violation) => `${violation.id}: ${violation.help} (${violation.nodes.map((node) => node.target.join(" ")).join(", ")})`);
  assert.deepEqual(summary, [], `axe on ${name}`);
  console.log(`axe ${name}: ${results.violations.length} violations, none serious`);
}

const checks = [];
function check(name) {
  checks.push(name);
  console.log(`ok - ${name}`);
}

const off = await serve({ APIKEYS_ADMIN_TOKEN: undefined, APIKEYS_ADMIN_TOKEN_FILE: undefined });
const on = await serve({ APIKEYS_ADMIN_TOKEN: adminToken });
const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  // Without an administrator's credential there is no dashboard, and the log says how to have one.
  {
    const response = await fetch(`${off.base}/dashboard`);
    assert.equal(response.status, 404);
    assert.match(off.logs(), /dashboard is off: set APIKEYS_ADMIN_TOKEN/);
    check("404 without an admin credential, and the log says how to enable it");
  }

  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, colorScheme: "light" });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: on.base });
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(error.message));
  // The 401 of the wrong token and the 403 of the forged change are expected; nothing else.
  const expected = /the server responded with a status of (401|403)/;
  page.on("console", (message) => message.type() === "error" && !expected.test(message.text()) && pageErrors.push(message.text()));

  // Sign in: a wrong token is refused; the right one, typed and sent by keyboard, signs in.
  await page.goto(`${on.base}/dashboard`);
  assert.match(page.url(), /\/dashboard\/sign-in$/);
  await page.screenshot({ path: join(shots, "sign-in-light-desktop.png"), fullPage: true });
  await page.getByLabel("Admin token").fill("not-the-token");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("That is not the admin token.").waitFor();
  check("a wrong token is refused");
  await page.getByLabel("Admin token").focus();
  await page.keyboard.type(adminToken);
  await page.keyboard.press("Enter");
  await page.waitForURL(/\/dashboard\/accounts$/);
  check("signed in with the admin token, by keyboard");
  const cookies = await context.cookies();
  const session = cookies.find((cookie) => cookie.name === "apikeys_dashboard");
  assert.ok(session && session.httpOnly && session.sameSite === "Strict" && session.expires > 0, JSON.stringify(session));
  assert.ok(!cookies.some((cookie) => cookie.value.includes(adminToken)));
  check("the session cookie is HttpOnly, SameSite=Strict and expires");

  // The accounts table, with serve's first account.
  await page.getByRole("link", { name: "default" }).waitFor();
  await page.screenshot({ path: join(shots, "accounts-light-desktop.png"), fullPage: true });
  await page.getByRole("link", { name: "default" }).click();
  await page.waitForURL(/\/dashboard\/accounts\/default$/);

  // Create a key: shown once with a copy button, gone on reload.
  await page.getByLabel("Name").fill("browser key");
  await page.getByLabel("Scopes").fill("orders:read keys:read");
  await page.getByRole("button", { name: "Create key" }).click();
  const shown = page.locator("#new-key");
  await shown.waitFor();
  const key = (await shown.textContent()).trim();
  assert.match(key, /^as_live_v1_/);
  await page.getByRole("button", { name: "Copy" }).click();
  await page.getByRole("button", { name: "Copied" }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), key);
  await page.screenshot({ path: join(shots, "account-created-light-desktop.png"), fullPage: true });
  assert.ok(!page.url().includes(key), "the key is in no URL");
  check("a created key is shown once, and Copy copies it");
  await page.reload();
  assert.equal(await page.locator("#new-key").count(), 0);
  assert.ok(!(await page.content()).includes(key));
  check("the key is gone on reload");

  // Use it with curl; its last-used time shows on the page.
  const row = page.locator("#keys tr", { hasText: "browser key" });
  assert.equal((await row.locator("[data-last-used]").textContent()).trim(), "—");
  assert.equal(curl(on.base, key), 200);
  await page.reload();
  const lastUsed = await page.locator("#keys tr", { hasText: "browser key" }).locator("[data-last-used] time").getAttribute("datetime");
  assert.ok(Math.abs(Date.parse(lastUsed) - Date.now()) < 60_000, lastUsed);
  check("a key used with curl shows its last-used time");

  // Roll serve's first key with a grace period: a new key, once; the table says what rolled into what.
  const first = page.locator("#keys tr", { hasText: "first key" });
  await first.getByLabel(/Grace period/).selectOption("3600");
  await first.getByRole("button", { name: /^Roll/ }).click();
  await page.getByText("Key rolled").waitFor();
  const rolled = (await page.locator("#new-key").textContent()).trim();
  assert.notEqual(rolled, on.firstKey);
  assert.equal(curl(on.base, rolled), 200);
  assert.equal(curl(on.base, on.firstKey), 200, "the old key works for its grace");
  await page.reload();
  assert.equal(await page.locator("#new-key").count(), 0);
  assert.equal(await page.locator("td.rolled", { hasText: "into as_live_v1_" }).count(), 1);
  check("roll shows the new key once and keeps the old one for its grace");

  // Revoke the key in use, after the confirmation; its next request is refused.
  page.once("dialog", (dialog) => {
    assert.match(dialog.message(), /^Revoke as_live_/);
    dialog.accept();
  });
  await page.locator("#keys tr", { hasText: "browser key" }).getByRole("button", { name: /^Revoke/ }).click();
  await page.getByText("was revoked").waitFor();
  assert.equal(curl(on.base, key), 401);
  assert.equal(await page.locator("#keys tr", { hasText: "browser key" }).count(), 0);
  check("a key in use is revoked after a confirmation, and its next request is refused");
  page.once("dialog", (dialog) => dialog.dismiss());
  await page.locator("#keys tr", { hasText: "first key" }).first().getByRole("button", { name: /^Revoke/ }).click();
  await page.waitForTimeout(200);
  assert.equal(curl(on.base, rolled), 200, "a dismissed confirmation revokes nothing");
  check("a dismissed confirmation revokes nothing");

  // The audit trail shows every change, by the dashboard.
  const trail = page.locator("section", { has: page.getByRole("heading", { name: "Audit trail" }) });
  for (const action of ["key.created", "key.rolled", "key.revoked"]) {
    assert.ok((await trail.getByText(action, { exact: true }).count()) >= 1, action);
  }
  assert.ok((await trail.getByText("admin dashboard").count()) >= 3);
  check("the audit trail shows the changes");

  // A change without the CSRF token is refused, with the session cookie and all.
  const forged = await page.evaluate(async () => {
    const response = await fetch("/dashboard/accounts/default/keys", {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "name=forged",
    });
    return response.status;
  });
  assert.equal(forged, 403);
  await page.reload();
  assert.equal(await page.locator("#keys tr", { hasText: "forged" }).count(), 0);
  check("a change without the CSRF token is refused");

  // Filter and sort the key table.
  const visible = () => page.locator("#keys tbody tr:not([hidden])").count();
  const rows = await visible();
  await page.getByLabel("Filter keys").fill("no such key");
  assert.equal(await visible(), 0);
  await page.getByLabel("Filter keys").fill("FIRST");
  assert.equal(await visible(), 2, "the first key and the key it rolled into");
  const prefix = (await page.locator("#keys tbody tr").first().locator("code").first().textContent()).trim();
  await page.getByLabel("Filter keys").fill(prefix);
  assert.equal(await visible(), 1, prefix);
  assert.equal(rows, 2);
  // A key pasted to find it finds its row, and is sent as its prefix: never in an address.
  await page.getByLabel("Filter keys").fill(rolled);
  assert.equal(await visible(), 1, "a pasted key finds its row");
  await page.getByLabel("Filter keys").press("Enter");
  await page.waitForURL(/filter=as_live/);
  assert.ok(!page.url().includes(rolled.slice(15)), page.url());
  assert.equal(await page.getByLabel("Filter keys").inputValue(), rolled.slice(0, 15));
  assert.equal(await page.locator("#keys tbody tr").count(), 1);
  await page.getByLabel("Filter keys").fill("");
  await page.getByRole("link", { name: "Name" }).click();
  await page.locator('th[aria-sort="ascending"]', { hasText: "Name" }).waitFor();
  check("the key table filters and sorts");

  // Every page passes axe; screenshots in light and dark, desktop and phone.
  await page.getByRole("link", { name: "Accounts" }).first().click();
  const pages = [
    ["accounts", `${on.base}/dashboard/accounts`],
    ["account", `${on.base}/dashboard/accounts/default`],
    ["revoke-confirmation", null],
  ];
  for (const scheme of ["light", "dark"]) {
    for (const [device, viewport] of [["desktop", { width: 1280, height: 860 }], ["phone", { width: 390, height: 844 }]]) {
      // axe needs a script of its own on the page, which the CSP refuses: only these contexts bypass it.
      const looking = await browser.newContext({ viewport, colorScheme: scheme, bypassCSP: true, isMobile: device === "phone" });
      await looking.addCookies([{ ...session, sameSite: "Strict" }]);
      const view = await looking.newPage();
      for (const [name, url] of pages) {
        if (url) {
          await view.goto(url);
        } else {
          // Without the script, revoking asks on a page of its own.
          await view.goto(`${on.base}/dashboard/accounts/default`);
          // form.submit() skips the script's confirmation, as a browser without scripts would.
          await view.locator("#keys tr", { hasText: "first key" }).first().locator("form[data-confirm]").evaluate((form) => form.submit());
          await view.getByRole("heading", { name: /^Revoke/ }).waitFor();
        }
        await view.screenshot({ path: join(shots, `${name}-${scheme}-${device}.png`), fullPage: true });
        await checkAccessibility(view, `${name} (${scheme}, ${device})`);
      }
      await looking.close();
    }
  }
  const signInDark = await browser.newContext({ viewport: { width: 390, height: 844 }, colorScheme: "dark", bypassCSP: true, isMobile: true });
  const signInPage = await signInDark.newPage();
  await signInPage.goto(`${on.base}/dashboard/sign-in`);
  await signInPage.screenshot({ path: join(shots, "sign-in-dark-phone.png"), fullPage: true });
  await checkAccessibility(signInPage, "sign-in (dark, phone)");
  await signInDark.close();
  check("every page passes axe-core with no serious violation, in light and dark, on a laptop and a phone");

  // Sign out: the session is over, here and for a copy of its cookie.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForURL(/\/dashboard\/sign-in$/);
  await page.goto(`${on.base}/dashboard/accounts`);
  assert.match(page.url(), /\/dashboard\/sign-in$/);
  const replay = await fetch(`${on.base}/dashboard/accounts`, { headers: { cookie: `${session.name}=${session.value}` }, redirect: "manual" });
  assert.equal(replay.status, 303);
  check("sign-out ends the session");

  assert.deepEqual(pageErrors, [], "no script error on any page");
  assert.ok(!on.logs().includes(key) && !on.logs().includes(rolled) && !on.logs().includes(adminToken), "no secret in the log");
  check("no script error, and no secret in the server's log");
  await context.close();
} finally {
  await browser.close();
  off.child.kill();
  on.child.kill();
}
console.log(`${checks.length} checks passed; screenshots in ${shots}`);
