// A hub that misbehaves, written with `ws`: what it sends is reported and
// never kills the client; a request it never answers fails, bounded.
import assert from "node:assert/strict";
import { test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";

import { HubError, ProtocolError, connectHub } from "../dist/index.js";
import { waitFor, within } from "./helpers.mjs";

/** A server that welcomes every client, then lets `script` drive the socket. */
async function fakeHub(script) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => server.once("listening", resolve));
  const connections = [];
  server.on("connection", (socket) => {
    connections.push(socket);
    socket.once("message", () => {
      socket.send(JSON.stringify({ type: "welcome", version: 1, serverId: "fake" }));
      script(socket);
    });
  });
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    connections,
    close: () => new Promise((resolve) => {
      for (const socket of connections) socket.terminate();
      server.close(resolve);
    }),
  };
}

test("bad frames from the hub are reported and the client keeps working", async () => {
  const hub = await fakeHub((socket) => {
    socket.send("this is not JSON");
    socket.send(JSON.stringify({ type: "fromTheFuture", id: 1 }));
    socket.send(JSON.stringify({ noType: true }));
    socket.send(Buffer.from([1, 2, 3]), { binary: true });
    socket.send(JSON.stringify({ type: "invalidation", topic: "t", revision: "01" }));
    socket.send(JSON.stringify({ type: "snapshot", id: 999, topic: "t", revision: "1", data: 1 }));
    socket.on("message", (raw) => {
      const request = JSON.parse(String(raw));
      if (request.type === "get") {
        socket.send(JSON.stringify({ type: "snapshot", id: request.id, topic: request.topic, revision: "7", data: { ok: true } }));
      }
    });
  });
  const reported = [];
  // An injected constructor: the `ws` package instead of the global.
  const client = connectHub({ url: hub.url, WebSocket, onError: (error) => reported.push(error) });
  try {
    await waitFor(() => reported.length >= 5, 5_000, "five reports");
    for (const error of reported) assert.ok(error instanceof ProtocolError, String(error));
    const messages = reported.map((e) => e.message).join("\n");
    assert.match(messages, /not JSON/);
    assert.match(messages, /unknown message type: fromTheFuture/);
    assert.match(messages, /without a type/);
    assert.match(messages, /binary frame/);
    assert.match(messages, /malformed invalidation/);
    assert.equal(client.status, "live");
    assert.deepEqual(await client.get("t"), { revision: "7", data: { ok: true } });
  } finally {
    client.close();
    await hub.close();
  }
});

test("a request the hub never answers times out; a socket that dies fails the rest", async () => {
  const hub = await fakeHub(() => {});
  const client = connectHub({ url: hub.url, WebSocket, requestTimeoutMs: 300, reconnect: { initialDelayMs: 50 } });
  try {
    await waitFor(() => client.status === "live");
    const silent = await within(client.get("t").catch((e) => e), 2_000);
    assert.ok(silent instanceof HubError);
    assert.equal(silent.code, "timeout");

    const slow = connectHub({ url: hub.url, WebSocket, requestTimeoutMs: 60_000 });
    await waitFor(() => slow.status === "live");
    const pending = slow.get("t").catch((e) => e);
    for (const socket of hub.connections) socket.terminate();
    const dropped = await within(pending, 2_000, "the pending request hung");
    assert.equal(dropped.code, "disconnected");
    slow.close();
  } finally {
    client.close();
    await hub.close();
  }
});

test("a hub that closes the handshake with unsupported_version stops the client", async () => {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => server.once("listening", resolve));
  let attempts = 0;
  server.on("connection", (socket) => {
    attempts += 1;
    socket.once("message", () => {
      socket.send(JSON.stringify({ type: "error", code: "unsupported_version", message: "speaks version 2" }));
      socket.close();
    });
  });
  const client = connectHub({ url: `ws://127.0.0.1:${server.address().port}`, WebSocket, reconnect: { initialDelayMs: 10 } });
  try {
    await waitFor(() => client.status === "closed", 5_000, "closed");
    assert.equal(client.lastError.code, "unsupported_version");
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(attempts, 1);
  } finally {
    client.close();
    await new Promise((resolve) => server.close(resolve));
  }
});

test("a replica keeps one fetch in flight and one queued, whatever the invalidations", async () => {
  let gets = 0;
  let revision = 1;
  const hub = await fakeHub((socket) => {
    socket.on("message", (raw) => {
      const request = JSON.parse(String(raw));
      if (request.type === "subscribe") {
        socket.send(JSON.stringify({ type: "subscribed", id: request.id, topic: request.topic, revision: "1" }));
      } else if (request.type === "get") {
        gets += 1;
        const at = String(revision);
        // A slow hub: answers after 100 ms, with what it had when asked.
        setTimeout(() => {
          socket.send(JSON.stringify({ type: "snapshot", id: request.id, topic: request.topic, revision: at, data: Number(at) }));
        }, 100);
      }
    });
    // Once started, a burst of 50 invalidations (no inline snapshots).
    setTimeout(() => {
      for (let i = 0; i < 50; i++) {
        revision += 1;
        socket.send(JSON.stringify({ type: "invalidation", topic: "doc", revision: String(revision) }));
      }
    }, 200);
  });
  const client = connectHub({ url: hub.url, WebSocket });
  try {
    const replica = client.topic("doc", { inline: false });
    const applied = [];
    replica.subscribe((snapshot) => applied.push(Number(snapshot.revision)));
    await replica.start();
    assert.equal(gets, 1, "the initial fetch");
    await waitFor(() => replica.revision === "51", 5_000, "the last revision");
    // The burst's first invalidation starts one fetch; the other 49 queue
    // one more, which is dropped: the fetch already brought revision 51.
    assert.equal(gets, 2);
    assert.deepEqual(applied, [...applied].sort((a, b) => a - b));
    assert.equal(replica.current.data, 51);
  } finally {
    client.close();
    await hub.close();
  }
});
