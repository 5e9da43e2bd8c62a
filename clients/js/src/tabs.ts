import { ClosedError, DisconnectedError, HubError, errorFromShape, errorToShape, type ErrorShape } from "./errors.js";
import {
  Hub,
  type ConnectionStatus,
  type GetOptions,
  type HubClient,
  type HubOptions,
  type InvalidationHandler,
  type SetOptions,
  type SubscribeOptions,
  type Unsubscribe,
} from "./hub.js";
import type { HubStatus, Invalidation, NotModified, Snapshot } from "./protocol.js";
import { Replica, type ReplicaOptions } from "./replica.js";

export interface SharedHubOptions extends HubOptions {
  /**
   * Tabs of one origin with the same name share one connection. Default:
   * derived from the URL and the token, so tabs with different tokens
   * never share.
   */
  name?: string;
}

/** A `HubClient` whose connection may live in another tab. */
export interface SharedHubClient extends HubClient {
  /** Whether this tab holds the connection. */
  readonly isLeader: boolean;
}

type Op = "get" | "set" | "sub" | "unsub" | "status";

type Message =
  | { k: "hello"; from: string }
  | { k: "leader"; from: string }
  | { k: "bye"; from: string }
  | { k: "status"; from: string; status: ConnectionStatus; error?: ErrorShape }
  | { k: "req"; from: string; to: string; rid: number; op: Op; args: unknown[] }
  | { k: "res"; from: string; to: string; rid: number; ok: boolean; value?: unknown; error?: ErrorShape }
  | { k: "inv"; from: string; inv: Invalidation };

interface LockManagerLike {
  request(name: string, options: { signal?: AbortSignal }, callback: () => Promise<void>): Promise<void>;
}

/**
 * Connects the tabs of one origin to a hub through one connection: one tab
 * holds it (elected with the Web Locks API, handed over when that tab
 * closes), the others reach the hub through it over `BroadcastChannel`.
 * Every tab's replicas keep their own revision gate, so a tab never
 * applies older data than it has. Where Web Locks or BroadcastChannel are
 * missing (Node, old browsers), this is a plain `connectHub`.
 */
export function connectSharedHub(options: SharedHubOptions): SharedHubClient {
  const locks = (globalThis as { navigator?: { locks?: LockManagerLike } }).navigator?.locks;
  if (typeof BroadcastChannel === "undefined" || !locks) {
    const hub = new Hub(options) as Hub & { isLeader?: boolean };
    Object.defineProperty(hub, "isLeader", { value: true });
    return hub as Hub & { isLeader: boolean };
  }
  return new SharedHub(options, locks);
}

interface LocalSubscription {
  handler: InvalidationHandler;
  inline: boolean;
}

class SharedHub implements SharedHubClient {
  #options: SharedHubOptions;
  #locks: LockManagerLike;
  #channel: BroadcastChannel;
  #id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  #hub: Hub | undefined;
  #leader: string | undefined;
  #status: ConnectionStatus = "connecting";
  #lastError: HubError | undefined;
  #statusListeners = new Set<(status: ConnectionStatus, error?: HubError) => void>();
  #subs = new Map<string, Map<number, LocalSubscription>>();
  #nextKey = 1;
  #nextRid = 1;
  #pending = new Map<number, { resolve(value: unknown): void; reject(error: HubError): void; timer: ReturnType<typeof setTimeout> }>();
  #leaderWaiters = new Set<() => void>();
  /** Leader only: one hub subscription per topic any tab wants, and which tabs want it. */
  #relays = new Map<string, Promise<Unsubscribe>>();
  #interest = new Map<string, Set<string>>();
  #abdicate: (() => void) | undefined;
  #abort = new AbortController();
  #closed = false;

  constructor(options: SharedHubOptions, locks: LockManagerLike) {
    this.#options = options;
    this.#locks = locks;
    const name = options.name ?? `state-sync:${options.url}:${fingerprint(options.token ?? "")}`;
    this.#channel = new BroadcastChannel(name);
    this.#channel.onmessage = (event: MessageEvent) => this.#receive(event.data as Message);
    this.#locks
      .request(`${name}:leader`, { signal: this.#abort.signal }, () => this.#lead())
      .catch(() => undefined);
    this.#post({ k: "hello", from: this.#id });
    const leave = () => this.#post({ k: "bye", from: this.#id });
    (globalThis as { addEventListener?: (type: string, listener: () => void) => void }).addEventListener?.(
      "pagehide",
      leave,
    );
  }

  get isLeader(): boolean {
    return this.#hub !== undefined;
  }

  get status(): ConnectionStatus {
    return this.#status;
  }

  get lastError(): HubError | undefined {
    return this.#lastError;
  }

  onStatus(listener: (status: ConnectionStatus, error?: HubError) => void): () => void {
    this.#statusListeners.add(listener);
    return () => this.#statusListeners.delete(listener);
  }

  get<T = unknown>(topic: string, options: GetOptions = {}): Promise<Snapshot<T> | NotModified> {
    return this.#call("get", [topic, options]) as Promise<Snapshot<T> | NotModified>;
  }

  set(topic: string, data: unknown, options: SetOptions = {}): Promise<string> {
    return this.#call("set", [topic, data, options]) as Promise<string>;
  }

  hubStatus(): Promise<HubStatus> {
    return this.#call("status", []) as Promise<HubStatus>;
  }

  async subscribe(topic: string, handler: InvalidationHandler, options: SubscribeOptions = {}): Promise<Unsubscribe> {
    let handlers = this.#subs.get(topic);
    const first = !handlers;
    if (!handlers) {
      handlers = new Map();
      this.#subs.set(topic, handlers);
    }
    const key = this.#nextKey++;
    handlers.set(key, { handler, inline: options.inline ?? true });
    try {
      if (first) await this.#call("sub", [topic]);
    } catch (error) {
      handlers.delete(key);
      if (handlers.size === 0) this.#subs.delete(topic);
      throw error;
    }
    return async () => {
      const current = this.#subs.get(topic);
      if (!current?.delete(key) || current.size > 0) return;
      this.#subs.delete(topic);
      await this.#call("unsub", [topic]).catch(() => undefined);
    };
  }

  topic<T = unknown>(topic: string, options?: ReplicaOptions<T>): Replica<T> {
    return new Replica<T>(this, topic, options);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#post({ k: "bye", from: this.#id });
    this.#abort.abort();
    this.#abdicate?.();
    this.#hub?.close();
    this.#hub = undefined;
    this.#failPending(new ClosedError());
    this.#setStatus("closed", new ClosedError());
    this.#channel.close();
  }

  // --- leadership --------------------------------------------------------

  /** Holds the lock for as long as this tab leads. */
  async #lead(): Promise<void> {
    if (this.#closed) return;
    const hub = new Hub(this.#options);
    this.#hub = hub;
    this.#relays.clear();
    this.#interest.clear();
    hub.onStatus((status, error) => {
      this.#setStatus(status, error);
      this.#post({ k: "status", from: this.#id, status, ...(error ? { error: errorToShape(error) } : {}) });
    });
    this.#newLeader(this.#id);
    this.#post({ k: "leader", from: this.#id });
    await new Promise<void>((resolve) => {
      this.#abdicate = resolve;
    });
  }

  #newLeader(id: string): void {
    const changed = this.#leader !== id;
    this.#leader = id;
    for (const wake of this.#leaderWaiters) wake();
    this.#leaderWaiters.clear();
    if (!changed) return;
    // Requests sent to the previous leader will not be answered.
    this.#failPending(new DisconnectedError("the tab holding the hub connection went away"));
    if (id !== this.#id && this.#status === "closed" && !this.#closed) this.#setStatus("connecting");
    // Subscribe again through the new leader; tell every handler where each topic is now.
    for (const topic of this.#subs.keys()) {
      this.#call("sub", [topic])
        .then((revision) => {
          if (typeof revision === "string") this.#deliver({ topic, revision });
        })
        .catch(() => undefined);
    }
  }

  /** Leader: ensures one hub subscription for `topic`; answers its revision. */
  async #relay(topic: string, tab: string): Promise<string | undefined> {
    const hub = this.#hub;
    if (!hub) throw new DisconnectedError("this tab no longer holds the connection");
    let tabs = this.#interest.get(topic);
    if (!tabs) {
      tabs = new Set();
      this.#interest.set(topic, tabs);
    }
    tabs.add(tab);
    let relay = this.#relays.get(topic);
    if (relay) {
      // Already relayed: the revision now, for the catch-up.
      const answer = await hub.get(topic, { ifNewerThan: "18446744073709551615" }).catch(() => undefined);
      await relay;
      return answer?.revision;
    }
    let revision: string | undefined;
    relay = hub
      .subscribeAt(topic, (inv) => {
        this.#post({ k: "inv", from: this.#id, inv });
        this.#deliver(inv);
      })
      .then((subscribed) => {
        revision = subscribed.revision;
        return subscribed.unsubscribe;
      });
    this.#relays.set(topic, relay);
    try {
      await relay;
    } catch (error) {
      this.#relays.delete(topic);
      throw error;
    }
    return revision;
  }

  async #unrelay(topic: string, tab: string): Promise<void> {
    const tabs = this.#interest.get(topic);
    tabs?.delete(tab);
    if (tabs && tabs.size > 0) return;
    this.#interest.delete(topic);
    const relay = this.#relays.get(topic);
    this.#relays.delete(topic);
    const unsubscribe = await relay?.catch(() => undefined);
    await unsubscribe?.();
  }

  // --- requests -----------------------------------------------------------

  async #call(op: Op, args: unknown[]): Promise<unknown> {
    if (this.#closed) throw new ClosedError();
    if (this.#hub) return this.#execute(op, args, this.#id);
    const timeout = this.#options.requestTimeoutMs ?? 10_000;
    if (this.#leader === undefined) await this.#waitForLeader(timeout);
    if (this.#hub) return this.#execute(op, args, this.#id);
    const to = this.#leader;
    if (to === undefined) throw new DisconnectedError("no tab holds the hub connection");
    const rid = this.#nextRid++;
    return new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(rid);
        reject(new HubError("timeout", `no answer through the tab holding the connection within ${timeout} ms`));
      }, timeout);
      this.#pending.set(rid, { resolve, reject, timer });
      this.#post({ k: "req", from: this.#id, to, rid, op, args });
    });
  }

  #waitForLeader(timeout: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const wake = () => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        this.#leaderWaiters.delete(wake);
        reject(new HubError("timeout", `no tab took the hub connection within ${timeout} ms`));
      }, timeout);
      this.#leaderWaiters.add(wake);
    });
  }

  /** Runs a request on this tab's connection (this tab leads). */
  async #execute(op: Op, args: unknown[], tab: string): Promise<unknown> {
    const hub = this.#hub;
    if (!hub) throw new DisconnectedError("this tab no longer holds the connection");
    switch (op) {
      case "get":
        return hub.get(args[0] as string, args[1] as GetOptions);
      case "set":
        return hub.set(args[0] as string, args[1], args[2] as SetOptions);
      case "status":
        return hub.hubStatus();
      case "sub":
        return this.#relay(args[0] as string, tab);
      case "unsub":
        return this.#unrelay(args[0] as string, tab);
    }
  }

  #receive(message: Message): void {
    if (this.#closed || !message || typeof message !== "object") return;
    switch (message.k) {
      case "hello":
        if (this.#hub) {
          this.#post({ k: "leader", from: this.#id });
          this.#post({ k: "status", from: this.#id, status: this.#hub.status });
        }
        return;
      case "leader":
        if (!this.#hub) this.#newLeader(message.from);
        return;
      case "bye":
        if (this.#hub) {
          for (const topic of [...this.#interest.keys()]) {
            if (this.#interest.get(topic)?.has(message.from)) void this.#unrelay(topic, message.from);
          }
        } else if (message.from === this.#leader) {
          this.#leader = undefined;
          this.#failPending(new DisconnectedError("the tab holding the hub connection closed"));
          this.#setStatus("interrupted");
        }
        return;
      case "status":
        if (message.from === this.#leader && !this.#hub) {
          this.#setStatus(message.status, message.error ? errorFromShape(message.error) : undefined);
        }
        return;
      case "req":
        if (message.to !== this.#id) return;
        this.#execute(message.op, message.args, message.from).then(
          (value) => this.#post({ k: "res", from: this.#id, to: message.from, rid: message.rid, ok: true, value }),
          (error: unknown) =>
            this.#post({ k: "res", from: this.#id, to: message.from, rid: message.rid, ok: false, error: errorToShape(error) }),
        );
        return;
      case "res": {
        if (message.to !== this.#id) return;
        const pending = this.#pending.get(message.rid);
        if (!pending) return;
        this.#pending.delete(message.rid);
        clearTimeout(pending.timer);
        if (message.ok) pending.resolve(message.value);
        else pending.reject(errorFromShape(message.error ?? { name: "HubError", code: "internal", message: "unknown" }));
        return;
      }
      case "inv":
        if (message.from === this.#leader && !this.#hub) this.#deliver(message.inv);
        return;
    }
  }

  #deliver(invalidation: Invalidation): void {
    const handlers = this.#subs.get(invalidation.topic);
    if (!handlers) return;
    for (const { handler, inline } of [...handlers.values()]) {
      const event = inline || !invalidation.snapshot ? invalidation : { ...invalidation, snapshot: undefined };
      try {
        handler(event);
      } catch {
        // A throwing handler must not stop the others.
      }
    }
  }

  #failPending(error: HubError): void {
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(error);
    }
    this.#pending.clear();
  }

  #setStatus(status: ConnectionStatus, error?: HubError): void {
    if (error) this.#lastError = error;
    if (this.#status === status) return;
    this.#status = status;
    for (const listener of [...this.#statusListeners]) {
      try {
        listener(status, error);
      } catch {
        // A throwing listener must not stop the others.
      }
    }
  }

  #post(message: Message): void {
    try {
      this.#channel.postMessage(message);
    } catch {
      // Closed channel: this tab is leaving.
    }
  }
}

/** A short, stable, non-secret fingerprint (FNV-1a) for channel names. */
function fingerprint(text: string): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash.toString(16);
}
