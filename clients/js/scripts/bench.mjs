// 200 replicas in this Node process over WebSocket, 50 writes/s of 1 KiB:
// convergence p50/p99 and client CPU per write, next to the Rust client
// (`statesync bench`) on the same hub in the same run.
//
//   npm run bench            (after `cargo build --release -p statesync`)
//   CLIENTS=500 WRITES=300 npm run bench
//   PAYLOAD_BYTES=16384 DELTAS=0 npm run bench   (whole snapshots only)
import { execFile } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { connectHub } from "../dist/index.js";
import { HubProcess, waitFor } from "../test/helpers.mjs";

const here = dirname(fileURLToPath(import.meta.url));
process.env.STATESYNC_BIN ??= join(process.env.CARGO_TARGET_DIR ?? join(here, "../../../target"), "release/statesync");
const CLIENTS = Number(process.env.CLIENTS ?? 200);
const WRITES = Number(process.env.WRITES ?? 200);
const RATE = Number(process.env.RATE ?? 50);
const PAYLOAD = Number(process.env.PAYLOAD_BYTES ?? 1024);
const DELTAS = process.env.DELTAS !== "0";

const hub = await HubProcess.start();
try {
  const topic = "statesync-bench:js";
  const writer = connectHub({ url: hub.url, clientId: "bench-writer" });
  const document = (seq) => ({ seq, payload: "x".repeat(PAYLOAD) });
  await writer.set(topic, document(0));

  const clients = [];
  const logs = [];
  for (let i = 0; i < CLIENTS; i++) {
    const client = connectHub({ url: hub.url, clientId: `bench-${i}`, deltas: DELTAS });
    const replica = client.topic(topic);
    const log = [];
    replica.subscribe((snapshot) => log.push([snapshot.revision, performance.now()]));
    await replica.start();
    clients.push({ client, replica });
    logs.push(log);
  }

  const statsBefore = (await writer.hubStatus()).stats;
  const cpuBefore = process.cpuUsage();
  const writes = [];
  const interval = 1000 / RATE;
  const start = performance.now();
  for (let seq = 1; seq <= WRITES; seq++) {
    const due = start + seq * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const sent = performance.now();
    const revision = await writer.set(topic, document(seq));
    writes.push([revision, sent]);
  }
  const last = writes.at(-1)[0];
  await waitFor(() => clients.every(({ replica }) => replica.revision === last), 60_000, "every JS replica converged");
  const cpu = process.cpuUsage(cpuBefore);
  const statsAfter = (await writer.hubStatus()).stats;
  const perWrite = (key) => Math.round((statsAfter[key] - statsBefore[key]) / WRITES);

  const newerOrEqual = (a, b) => a.length > b.length || (a.length === b.length && a >= b);
  const latencies = writes
    .map(([revision, sent]) =>
      Math.max(...logs.map((log) => (log.find(([r]) => newerOrEqual(r, revision))?.[1] ?? Infinity) - sent)),
    )
    .sort((a, b) => a - b);
  const at = (p) => latencies[Math.round((latencies.length - 1) * p)];
  const round = (x) => Math.round(x * 100) / 100;
  const js = {
    client: "JavaScript (this package, Node's WebSocket)",
    clients: CLIENTS,
    writes: WRITES,
    p50_ms: round(at(0.5)),
    p99_ms: round(at(0.99)),
    max_ms: round(at(1)),
    client_cpu_ms_per_write: round((cpu.user + cpu.system) / 1000 / WRITES),
    deltas: DELTAS,
    hub_bytes_out_per_write: perWrite("bytesSent"),
    deltas_per_write: perWrite("snapshotsAsDeltas"),
  };
  for (const { client } of clients) client.close();
  writer.close();

  const { stdout } = await promisify(execFile)(process.env.STATESYNC_BIN, [
    "bench", "--url", hub.url, "--clients", String(CLIENTS), "--writes", String(WRITES),
    "--rate", String(RATE), "--payload-bytes", String(PAYLOAD), "--topic", "statesync-bench:rust", "--json",
    ...(DELTAS ? [] : ["--no-deltas"]),
  ]);
  const rust = { client: "Rust (statesync bench)", ...JSON.parse(stdout) };
  console.log(JSON.stringify(js));
  console.log(JSON.stringify(rust));
  console.log(
    JSON.stringify({
      js_over_rust_p50: round(js.p50_ms / rust.p50_ms),
      js_over_rust_p99: round(js.p99_ms / rust.p99_ms),
      js_over_rust_cpu_per_write: round(js.client_cpu_ms_per_write / rust.client_cpu_ms_per_write),
    }),
  );
} finally {
  await hub.stop();
}
