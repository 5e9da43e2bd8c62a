// Test helpers: a real `statesync serve` on a free loopback port, the CLI,
// and bounded waits (a regression fails, it does not hang).
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));

/** The `statesync` binary: `STATESYNC_BIN`, else the workspace's debug build (under `CARGO_TARGET_DIR` when set). */
export function statesyncBin() {
  const target = process.env.CARGO_TARGET_DIR ?? join(here, "../../../target");
  const bin = process.env.STATESYNC_BIN ?? join(target, "debug/statesync");
  if (!existsSync(bin)) {
    throw new Error(`${bin} is missing: run \`cargo build -p statesync\` (or set STATESYNC_BIN)`);
  }
  return bin;
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A hub process; `restart()` brings it back on the same port and store. */
export class HubProcess {
  static async start({ token, port } = {}) {
    const hub = new HubProcess();
    hub.dir = mkdtempSync(join(tmpdir(), "statesync-js-"));
    hub.token = token;
    hub.port = port ?? (await freePort());
    await hub.#spawn();
    return hub;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async #spawn() {
    const env = { ...process.env, STATESYNC_LOG: "error" };
    if (this.token) env.STATESYNC_TOKEN = this.token;
    else delete env.STATESYNC_TOKEN;
    this.child = spawn(
      statesyncBin(),
      ["serve", "--no-fsync", "--data-dir", this.dir, "--ws", `127.0.0.1:${this.port}`],
      { env, stdio: ["ignore", "pipe", "inherit"] },
    );
    const lines = createInterface({ input: this.child.stdout });
    const first = await within(
      new Promise((resolve, reject) => {
        lines.once("line", resolve);
        this.child.once("exit", (code) => reject(new Error(`the hub exited with ${code}`)));
      }),
      10_000,
      "the hub did not start",
    );
    const ready = JSON.parse(first);
    if (ready.event !== "listening") throw new Error(`hub said ${first}`);
    this.socket = ready.socket;
    this.liveView = ready.live_view;
  }

  /** SIGKILL: no shutdown, no goodbye to clients. */
  async kill() {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
  }

  async restart() {
    await this.kill();
    await this.#spawn();
  }

  async stop() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Runs `statesync ARGS --socket <this hub>`; resolves {code, stdout, stderr}. */
  async cli(...args) {
    const env = { ...process.env };
    if (this.token) env.STATESYNC_TOKEN = this.token;
    try {
      const { stdout, stderr } = await promisify(execFile)(statesyncBin(), [...args, "--socket", this.socket], { env });
      return { code: 0, stdout, stderr };
    } catch (error) {
      return { code: error.code, stdout: error.stdout, stderr: error.stderr };
    }
  }

  /** `statesync set TOPIC JSON`; resolves the revision. */
  async set(topic, value) {
    const result = await this.cli("set", topic, JSON.stringify(value));
    if (result.code !== 0) throw new Error(`set failed: ${result.stderr}`);
    return JSON.parse(result.stdout).revision;
  }
}

/** Rejects with `message` unless `promise` settles within `ms`. */
export function within(promise, ms, message = `not within ${ms} ms`) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(message)), ms);
    }),
  ]);
}

/** Polls `condition` until it is true; fails after `ms`. */
export async function waitFor(condition, ms = 10_000, what = "the condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await condition()) return;
    if (Date.now() > deadline) throw new Error(`${what} did not hold within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
