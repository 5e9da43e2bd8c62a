// The package in a real Chromium (Debian's `chromium`, driven by
// playwright-core): tabs of one origin sharing one hub connection, another
// origin on its own, a hub killed mid-stream, the shared connection handed
// over when its tab closes, a large document arriving as deltas, a refused
// token, and the hub's live view.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { HubProcess, sleep, waitFor } from "../helpers.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TOKEN = "browser-s3cret";

/** Serves the test page and the package's browser build on 127.0.0.1:port. */
async function origin() {
  const files = {
    "/tab.html": ["text/html", readFileSync(join(here, "tab.html"))],
    "/statesync.iife.js": ["text/javascript", readFileSync(join(here, "../../dist/statesync.iife.js"))],
  };
  const server = createServer((request, response) => {
    const file = files[request.url];
    if (!file) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": file[0] }).end(file[1]);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

async function openTab(context, site, hub, token = TOKEN) {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`page error: ${error.message}`));
  await page.goto(`${site.url}/tab.html`);
  const started = await page.evaluate(([url, token]) => window.startTab(url, token), [hub.url, token]);
  return { page, started };
}

const state = (tab) => tab.page.evaluate(() => window.state());

async function converged(tabs, revision, what) {
  await waitFor(
    async () => (await Promise.all(tabs.map(state))).every((s) => s.revision === revision),
    20_000,
    what,
  );
}

function assertIncreasing(applied) {
  for (let i = 1; i < applied.length; i++) {
    const [a, b] = [applied[i - 1], applied[i]];
    assert.ok(b.length > a.length || (b.length === a.length && b > a), `revision ${b} after ${a}`);
  }
}

// Missing Chromium fails the run (scripts/install-deps.sh installs it),
// unless STATESYNC_SKIP_BROWSER_TESTS=1 says to skip on purpose.
describe("in Chromium", { skip: process.env.STATESYNC_SKIP_BROWSER_TESTS === "1" }, () => {
  let browser;
  let hub;
  let siteA;
  let siteB;

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: install Debian's chromium or set CHROMIUM`);
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--disable-backgrounding-occluded-windows",
      ],
    });
    hub = await HubProcess.start({ token: TOKEN });
    siteA = await origin();
    siteB = await origin();
  });

  after(async () => {
    await browser?.close();
    await hub?.stop();
    await siteA?.close();
    await siteB?.close();
  });

  test("tabs converge through a hub restart and hand the shared connection over", async () => {
    await hub.set("counter", 0);
    const context = await browser.newContext();
    try {
      const a1 = await openTab(context, siteA, hub);
      const a2 = await openTab(context, siteA, hub);
      const b1 = await openTab(context, siteB, hub);
      for (const tab of [a1, a2, b1]) assert.ok(!String(tab.started).startsWith("error"), String(tab.started));

      // One connection per origin: the two tabs of A share one.
      const leadersA = (await Promise.all([a1, a2].map(state))).filter((s) => s.leader).length;
      assert.equal(leadersA, 1);
      assert.equal((await state(b1)).leader, true);
      const status = JSON.parse((await hub.cli("status", "--json")).stdout);
      // The two origins' connections, and the status command's own.
      assert.equal(status.stats.connections, 3, JSON.stringify(status.stats));

      // A stream of CLI writes; the hub is killed and restarted halfway.
      let last;
      for (let i = 1; i <= 30; i++) {
        if (i === 15) await hub.restart();
        last = await hub.set("counter", i);
        await sleep(20);
      }
      await converged([a1, a2, b1], last, "every tab at the last revision after the restart");
      for (const tab of [a1, a2, b1]) {
        const s = await state(tab);
        assert.equal(s.data, 30);
        assertIncreasing(s.applied);
        assert.ok(s.statuses.some((x) => x.startsWith("interrupted")), JSON.stringify(s.statuses));
        assert.equal(s.status, "live");
      }

      // Close the tab holding A's connection: the other tab of A takes it.
      const [holder, other] = (await state(a1)).leader ? [a1, a2] : [a2, a1];
      await holder.page.close();
      await waitFor(async () => (await state(other)).leader, 10_000, "the other tab of A took the connection");
      for (let i = 31; i <= 40; i++) last = await hub.set("counter", i);
      await converged([other, b1], last, "converged after the handover");
      const s = await state(other);
      assert.equal(s.data, 40);
      assertIncreasing(s.applied);
    } finally {
      await context.close();
    }
  });

  test("a large document reaches the tabs as deltas of the one before", async () => {
    const doc = (seq) => ({ seq, note: `é ${seq}`, items: Array.from({ length: 300 }, (_, i) => `item ${i}`) });
    const deltasSent = async () => JSON.parse((await hub.cli("status", "--json")).stdout).stats.snapshotsAsDeltas;
    await hub.set("doc", doc(0));
    const context = await browser.newContext();
    try {
      const tabs = [await openTab(context, siteA, hub), await openTab(context, siteA, hub)];
      for (const tab of tabs) assert.ok(!(await tab.page.evaluate(() => window.follow("doc"))).startsWith("error"));
      const followed = (tab) => tab.page.evaluate(() => window.followed("doc"));
      const before = await deltasSent();
      for (let seq = 1; seq <= 5; seq++) {
        const revision = await hub.set("doc", doc(seq));
        await waitFor(
          async () => (await Promise.all(tabs.map(followed))).every((s) => s.revision === revision),
          20_000,
          `every tab at write ${seq}`,
        );
      }
      for (const tab of tabs) assert.deepEqual((await followed(tab)).data, doc(5));
      // One shared connection: every write after the first reached it as a delta.
      assert.ok((await deltasSent()) - before >= 4, "deltas were sent");
    } finally {
      await context.close();
    }
  });

  test("a wrong token shows the error and is not retried", async () => {
    const context = await browser.newContext();
    try {
      const tab = await openTab(context, siteA, hub, "wrong");
      assert.equal(tab.started, "error:unauthorized");
      const s = await state(tab);
      assert.equal(s.status, "closed");
      assert.equal(s.lastError, "unauthorized");
      await sleep(1_000);
      assert.deepEqual((await state(tab)).statuses, ["closed:unauthorized"]);
    } finally {
      await context.close();
    }
  });

  test("the live view shows CLI writes within a second and reports an edit conflict", async () => {
    await hub.set("counter", 100);
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      const errors = [];
      page.on("pageerror", (error) => errors.push(error.message));
      assert.ok(hub.liveView, "the hub prints its live view address");
      await page.goto(hub.liveView);
      assert.ok(!page.url().includes(TOKEN));
      await page.fill("#token", TOKEN);
      await page.click("#login button[type=submit]");
      const row = page.locator('tr[data-topic="counter"]');
      await row.locator(".revision").filter({ hasText: /\d/ }).waitFor({ timeout: 10_000 });
      assert.ok(!page.url().includes(TOKEN), "the token stays out of the URL");
      assert.match(await page.textContent("#clients"), /^\d+$/);

      const written = await hub.set("counter", 101);
      const shown = Date.now();
      await row.locator(".revision", { hasText: written }).waitFor({ timeout: 1_000 });
      assert.ok(Date.now() - shown <= 1_000);
      assert.equal((await row.locator(".data pre").textContent()).trim(), "101");

      // Edit at 101; another write lands first; saving reports the conflict.
      await row.locator("button.edit").click();
      const newer = await hub.set("counter", 102);
      await page.fill("#edit-data", "555");
      await page.click("#editor button[type=submit]");
      const message = page.locator("#edit-message");
      await message.filter({ hasText: "Conflict" }).waitFor({ timeout: 5_000 });
      assert.match(await message.textContent(), new RegExp(`revision ${newer}`));
      const { stdout } = await hub.cli("get", "counter");
      assert.equal(JSON.parse(stdout).data, 102, "the stale edit did not overwrite");

      // Editing again from the newer revision saves.
      await row.locator(".revision", { hasText: newer }).waitFor({ timeout: 5_000 });
      await row.locator("button.edit").click();
      await page.fill("#edit-data", "556");
      await page.click("#editor button[type=submit]");
      await message.filter({ hasText: "Saved" }).waitFor({ timeout: 5_000 });
      assert.equal(JSON.parse((await hub.cli("get", "counter")).stdout).data, 556);
      assert.deepEqual(errors, []);
    } finally {
      await context.close();
    }
  });
});
