// Deltas (docs/PROTOCOL.md, "Deltas"): against a real hub, a large document
// changed in one place travels as deltas and every replica ends on the same
// data; against a hub written here, deltas are made on the exact text the
// hub sent, and one that does not apply is never applied.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";

import { ProtocolError, connectHub } from "../dist/index.js";
import { HubProcess, waitFor, within } from "./helpers.mjs";

const fast = { reconnect: { initialDelayMs: 20, maxDelayMs: 200 }, requestTimeoutMs: 5_000 };

describe("a real hub", () => {
  let hub;
  before(async () => {
    hub = await HubProcess.start();
  });
  after(async () => {
    await hub.stop();
  });

  const document = (seq) => ({ seq, note: `é ${seq} ✓`, items: Array.from({ length: 400 }, (_, i) => `item ${i}`) });
  const deltasSent = async (client) => (await client.hubStatus()).stats.snapshotsAsDeltas;

  test("a large document changed in one place travels as deltas, and the replica converges", async () => {
    const writer = connectHub({ url: hub.url, ...fast });
    const reported = [];
    const client = connectHub({ url: hub.url, onError: (e) => reported.push(e), ...fast });
    try {
      await writer.set("deltas-doc", document(0));
      const replica = client.topic("deltas-doc");
      await within(replica.start(), 5_000, "the replica did not start");
      const before = await deltasSent(writer);
      let last;
      for (let seq = 1; seq <= 5; seq++) {
        last = await writer.set("deltas-doc", document(seq));
        await waitFor(() => replica.revision === last, 5_000, `the replica at write ${seq}`);
        assert.deepEqual(replica.current.data, document(seq));
      }
      // The first push is whole (the replica had fetched); each one after
      // it is a delta of the one before.
      assert.ok((await deltasSent(writer)) - before >= 4, "deltas were sent");
      // Each applied: none fell back to a fetch.
      assert.deepEqual(reported, []);
    } finally {
      writer.close();
      client.close();
    }
  });

  test("a client that does not ask for deltas gets whole snapshots", async () => {
    const writer = connectHub({ url: hub.url, ...fast });
    const client = connectHub({ url: hub.url, deltas: false, ...fast });
    try {
      await writer.set("whole-doc", document(0));
      const replica = client.topic("whole-doc");
      await within(replica.start(), 5_000, "the replica did not start");
      const before = await deltasSent(writer);
      for (let seq = 1; seq <= 3; seq++) {
        const revision = await writer.set("whole-doc", document(seq));
        await waitFor(() => replica.revision === revision, 5_000, `the replica at write ${seq}`);
        assert.deepEqual(replica.current.data, document(seq));
      }
      assert.equal(await deltasSent(writer), before);
    } finally {
      writer.close();
      client.close();
    }
  });
});

/** A hub that welcomes, confirms subscriptions at revision 1, and sends `frames` after the first. */
async function scriptedHub(frames) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => server.once("listening", resolve));
  const subscribes = [];
  server.on("connection", (socket) => {
    socket.on("message", (raw) => {
      const request = JSON.parse(String(raw));
      if (request.type === "hello") {
        socket.send(JSON.stringify({ type: "welcome", version: 1, serverId: "scripted" }));
      } else if (request.type === "subscribe") {
        subscribes.push(request);
        socket.send(JSON.stringify({ type: "subscribed", id: request.id, topic: request.topic, revision: "1" }));
        // Once: a client subscribing before it is live subscribes again when it is.
        if (subscribes.length === 1) for (const frame of frames) socket.send(frame);
      }
    });
  });
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    subscribes,
    close: () => new Promise((resolve) => {
      for (const socket of server.clients) socket.terminate();
      server.close(resolve);
    }),
  };
}

const bytes = (text) => Buffer.byteLength(text, "utf8");

test("deltas are made on the text as the hub sent it, in bytes of UTF-8", async () => {
  // Text that JSON.stringify would write otherwise: spaces, an escape, an
  // integer-like key (JavaScript would move it first), a nested `data`.
  const base = '{ "b": "é\\"}{", "2": [1, {"data": "]"}], "n": 1.0 }';
  const prefix = '{ "b": "é\\"}{", "2": [1, {"data": "]"}], "n": ';
  const changed = base.replace("1.0", "2.5");
  const next = changed.replace('"é', '"ü✓');
  const frames = [
    `{"type":"invalidation","topic":"t","revision":"2","snapshot":{"revision":"2","data":${base}}}`,
    JSON.stringify({
      type: "invalidation",
      topic: "t",
      revision: "3",
      delta: { base: "2", revision: "3", splices: [[bytes(prefix), 3, "2.5"]], len: bytes(changed), baseLen: bytes(base) },
    }),
    JSON.stringify({
      type: "invalidation",
      topic: "t",
      revision: "4",
      delta: { base: "3", revision: "4", splices: [[8, 2, "ü✓"]], len: bytes(next), baseLen: bytes(changed) },
    }),
  ];
  const hub = await scriptedHub(frames);
  const client = connectHub({ url: hub.url, WebSocket, ...fast });
  const seen = [];
  try {
    await client.subscribe("t", (invalidation) => seen.push(invalidation));
    await waitFor(() => seen.length === 3, 5_000, "three invalidations");
    assert.equal(hub.subscribes[0].delta, true);
    assert.deepEqual(
      seen.map((i) => i.snapshot),
      [
        { revision: "2", data: JSON.parse(base) },
        { revision: "3", data: JSON.parse(changed) },
        { revision: "4", data: JSON.parse(next) },
      ],
    );
  } finally {
    client.close();
    await hub.close();
  }
});

test("a delta that does not apply is never applied: the handler is told to fetch", async () => {
  const base = '{"v":"abé"}'; // 12 bytes: é is bytes 8 and 9
  const delta = (revision, fields) =>
    JSON.stringify({
      type: "invalidation",
      topic: "t",
      revision,
      delta: { base: "2", revision, splices: [[6, 1, "X"]], len: 12, baseLen: 12, ...fields },
    });
  const frames = [
    `{"type":"invalidation","topic":"t","revision":"2","snapshot":{"revision":"2","data":${base}}}`,
    delta("3", { base: "1" }), // not the kept base: fetch, nothing to report
    delta("4", { baseLen: 13 }), // the kept base has another length
    delta("5", { splices: [[11, 5, "X"]] }), // out of bounds
    delta("6", { splices: [[6, 1, "X"], [5, 1, "Y"]] }), // out of order
    delta("7", { len: 1e15 }), // a length the splices do not make
    delta("8", { splices: [[9, 1, "x"]] }), // cuts é: not UTF-8
    delta("9", { splices: [[5, 1, "X"]] }), // UTF-8, not JSON: {"v":Xabé"}
    delta("10", { splices: "nonsense" }),
  ];
  const hub = await scriptedHub(frames);
  const reported = [];
  const client = connectHub({ url: hub.url, WebSocket, onError: (e) => reported.push(e), ...fast });
  const seen = [];
  try {
    await client.subscribe("t", (invalidation) => seen.push(invalidation));
    await waitFor(() => seen.length === frames.length, 5_000, "every invalidation");
    assert.deepEqual(seen[0].snapshot, { revision: "2", data: { v: "abé" } });
    for (const invalidation of seen.slice(1)) assert.equal(invalidation.snapshot, undefined, invalidation.revision);
    assert.equal(reported.length, frames.length - 2, reported.map(String).join("\n"));
    for (const error of reported) assert.ok(error instanceof ProtocolError, String(error));
    assert.equal(client.status, "live");
  } finally {
    client.close();
    await hub.close();
  }
});

test("only subscriptions with inline snapshots ask for deltas, unless deltas: false", async () => {
  const hub = await scriptedHub([]);
  const asking = connectHub({ url: hub.url, WebSocket, ...fast });
  const refusing = connectHub({ url: hub.url, WebSocket, deltas: false, ...fast });
  try {
    await asking.subscribe("inline", () => {});
    await asking.subscribe("plain", () => {}, { inline: false });
    await refusing.subscribe("refused", () => {});
    const asked = (topic) => hub.subscribes.filter((s) => s.topic === topic).map((s) => s.delta);
    assert.ok(asked("inline").length > 0 && asked("inline").every((d) => d === true));
    assert.ok(asked("plain").length > 0 && asked("plain").every((d) => d === undefined));
    assert.ok(asked("refused").length > 0 && asked("refused").every((d) => d === undefined));
  } finally {
    asking.close();
    refusing.close();
    await hub.close();
  }
});
