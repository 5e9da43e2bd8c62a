// The client against a real `statesync serve`, over Node's WebSocket.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  ConflictError,
  DisconnectedError,
  HubError,
  compareRevisions,
  connectHub,
  createHubSource,
  isRevision,
} from "../dist/index.js";
import { HubProcess, sleep, waitFor, within } from "./helpers.mjs";

const fast = { reconnect: { initialDelayMs: 20, maxDelayMs: 200 }, requestTimeoutMs: 5_000 };

describe("one hub", () => {
  let hub;
  before(async () => {
    hub = await HubProcess.start();
  });
  after(async () => {
    await hub.stop();
  });

  test("get, set and compare-and-set with a typed conflict", async () => {
    const client = connectHub({ url: hub.url, ...fast });
    try {
      const first = await client.set("settings", { theme: "dark" });
      assert.ok(isRevision(first));
      assert.deepEqual(await client.get("settings"), { revision: first, data: { theme: "dark" } });
      assert.deepEqual(await client.get("settings", { ifNewerThan: first }), { notModified: true, revision: first });

      const second = await client.set("settings", { theme: "light" }, { expectedRevision: first });
      assert.ok(compareRevisions(second, first) > 0);
      const lost = await client.set("settings", { theme: "blue" }, { expectedRevision: first }).catch((e) => e);
      assert.ok(lost instanceof ConflictError, String(lost));
      assert.equal(lost.code, "conflict");
      assert.equal(lost.currentRevision, second);
      assert.deepEqual((await client.get("settings")).data, { theme: "light" });
    } finally {
      client.close();
    }
  });

  test("every error code of the hub arrives as a typed error", async () => {
    const client = connectHub({ url: hub.url, ...fast });
    try {
      const unknown = await client.get("no-such-topic").catch((e) => e);
      assert.ok(unknown instanceof HubError);
      assert.equal(unknown.code, "unknown_topic");
      const blank = await client.set("   ", 1).catch((e) => e);
      assert.equal(blank.code, "invalid_topic");
      const badRevision = await client.set("settings", 1, { expectedRevision: "01" }).catch((e) => e);
      assert.equal(badRevision.code, "invalid_revision");
      const tooLarge = await client.set("big", "x".repeat(2 << 20)).catch((e) => e);
      assert.ok(["too_large", "disconnected"].includes(tooLarge.code), tooLarge.code);
      // The connection survives request errors.
      await waitFor(() => client.status === "live", 5_000, "live again");
      assert.ok(isRevision(await client.set("settings", { ok: true })));
    } finally {
      client.close();
    }
  });

  test("a replica converges on a stream of CLI writes and never goes backwards", async () => {
    const client = connectHub({ url: hub.url, ...fast });
    try {
      await hub.set("counter", 0);
      const replica = client.topic("counter");
      const applied = [];
      replica.subscribe((snapshot) => applied.push(snapshot.revision));
      await replica.start();
      let last;
      for (let i = 1; i <= 20; i++) last = await hub.set("counter", i);
      await waitFor(() => replica.current?.revision === last, 10_000, "replica at the last revision");
      assert.equal(replica.current.data, 20);
      for (let i = 1; i < applied.length; i++) assert.ok(compareRevisions(applied[i], applied[i - 1]) > 0);
      // Small snapshots come inline: the replica fetched none of them.
      const stats = (await client.hubStatus()).stats;
      assert.ok(stats.snapshotsInlined >= applied.length - 1, JSON.stringify(stats));
      await replica.stop();
    } finally {
      client.close();
    }
  });

  test("update retries compare-and-set until every increment is in", async () => {
    const a = connectHub({ url: hub.url, ...fast });
    const b = connectHub({ url: hub.url, ...fast });
    try {
      await hub.set("cas", 0);
      const ra = a.topic("cas");
      const rb = b.topic("cas");
      await Promise.all([ra.start(), rb.start()]);
      const increments = (replica) =>
        (async () => {
          for (let i = 0; i < 25; i++) await replica.update((n) => n + 1, { maxAttempts: 100 });
        })();
      await within(Promise.all([increments(ra), increments(rb)]), 30_000);
      assert.equal((await a.get("cas")).data, 50);
    } finally {
      a.close();
      b.close();
    }
  });

  test("drop-in subscriber and provider for @statesync/core", async () => {
    const client = connectHub({ url: hub.url, ...fast });
    try {
      await hub.set("core", { v: 0 });
      const { subscriber, provider } = createHubSource(client, "core");
      const events = [];
      const unsubscribe = await subscriber.subscribe((event) => events.push(event));
      assert.equal(typeof unsubscribe, "function");
      const revision = await client.set("core", { v: 1 }, { sourceId: "writer-1" });
      await waitFor(() => events.some((e) => e.revision === revision), 5_000, "the invalidation");
      const event = events.find((e) => e.revision === revision);
      assert.deepEqual(event, { topic: "core", revision, sourceId: "writer-1" });
      const before = (await client.hubStatus()).stats.snapshotsSent;
      // Answered from the inline snapshot: no `get` reaches the hub.
      assert.deepEqual(await provider.getSnapshot(), { revision, data: { v: 1 } });
      assert.equal((await client.hubStatus()).stats.snapshotsSent, before);
      unsubscribe();
    } finally {
      client.close();
    }
  });

  test("a request still waiting when the client closes fails instead of hanging", async () => {
    const client = connectHub({ url: hub.url, ...fast });
    await waitFor(() => client.status === "live");
    const pending = client.get("settings");
    client.close();
    const error = await within(pending.catch((e) => e), 2_000);
    assert.ok(error instanceof HubError);
    assert.equal(error.code, "closed");
    await assert.rejects(client.get("settings"), (e) => e.code === "closed");
  });
});

describe("hub restarts", () => {
  test("status events, reconnect, resubscribe and a catch-up after a SIGKILL", async () => {
    const hub = await HubProcess.start();
    const client = connectHub({ url: hub.url, ...fast });
    try {
      const statuses = [];
      client.onStatus((status) => statuses.push(status));
      await hub.set("doc", 1);
      const replica = client.topic("doc");
      await replica.start();
      const events = [];
      await client.subscribe("doc", (event) => events.push(event.revision));

      await hub.kill();
      await waitFor(() => client.status === "interrupted", 5_000, "interrupted");
      // A request made while the hub is down waits for it (bounded).
      const waiting = client.get("doc");
      await hub.restart();
      await waitFor(() => client.status === "live", 10_000, "live again");
      assert.equal((await within(waiting, 6_000)).data, 1);
      // The catch-up invalidation after the reconnect, without a write.
      await waitFor(() => events.length > 0, 5_000, "a catch-up invalidation");
      assert.equal(events[0], replica.revision);

      const last = await hub.set("doc", 2);
      await waitFor(() => replica.current.revision === last, 5_000, "converged after the restart");
      assert.deepEqual(statuses.slice(0, 2), ["live", "interrupted"]);
      assert.equal(statuses.at(-1), "live");
      client.close();
      assert.equal(client.status, "closed");
      assert.equal(statuses.at(-1), "closed");
    } finally {
      client.close();
      await hub.stop();
    }
  });

  test("requests in flight when the hub dies fail with DisconnectedError", async () => {
    const hub = await HubProcess.start();
    const client = connectHub({ url: hub.url, ...fast });
    try {
      await hub.set("doc", 1);
      await waitFor(() => client.status === "live");
      const many = Array.from({ length: 200 }, (_, i) => client.set("doc", i).catch((e) => e));
      await hub.kill();
      const outcomes = await within(Promise.all(many), 7_000, "a request hung");
      for (const outcome of outcomes) {
        assert.ok(typeof outcome === "string" || outcome instanceof DisconnectedError, String(outcome));
      }
    } finally {
      client.close();
      await hub.stop();
    }
  });
});

describe("refusals", () => {
  test("a wrong token closes the client with `unauthorized` and it stops retrying", async () => {
    const hub = await HubProcess.start({ token: "s3cret" });
    try {
      const statuses = [];
      const client = connectHub({ url: hub.url, token: "wrong", ...fast });
      client.onStatus((status) => statuses.push(status));
      await waitFor(() => client.status === "closed", 5_000, "closed");
      assert.equal(client.lastError.code, "unauthorized");
      await sleep(500);
      assert.deepEqual(statuses, ["closed"]);
      await assert.rejects(client.get("x"), (e) => e.code === "unauthorized");

      const good = connectHub({ url: hub.url, token: "s3cret", ...fast });
      assert.ok(isRevision(await good.set("x", 1)));
      good.close();
    } finally {
      await hub.stop();
    }
  });
});
