import {
  ClosedError,
  ConflictError,
  DisconnectedError,
  FATAL_CODES,
  HubError,
  ProtocolError,
  TimeoutError,
} from "./errors.js";
import {
  PROTOCOL_VERSION,
  type HubStatus,
  type Invalidation,
  type NotModified,
  type ServerMessage,
  type Snapshot,
} from "./protocol.js";
import { applyDelta, rawMember, utf8, type BaseText } from "./delta.js";
import { isNewer, isRevision } from "./revision.js";
import { Replica, type ReplicaOptions } from "./replica.js";

/**
 * `connecting` until the first `welcome`; `live` while connected;
 * `interrupted` after the connection dropped, while reconnecting;
 * `closed` after `close()` or a refusal reconnecting cannot fix
 * (`unauthorized`, `unsupported_version`: see `lastError`).
 */
export type ConnectionStatus = "connecting" | "live" | "interrupted" | "closed";

/** The subset of the WebSocket API this client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** A WebSocket constructor: the browser's, Node's global, or e.g. `ws`. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Reconnect backoff: exponential from `initialDelayMs` to `maxDelayMs`, with jitter. */
export interface ReconnectOptions {
  /** First delay (default 250 ms). */
  initialDelayMs?: number;
  /** Largest delay (default 10 s). */
  maxDelayMs?: number;
  /** Attempts in a row before giving up and closing (default: no limit). */
  maxAttempts?: number;
}

export interface HubOptions {
  /** The hub's WebSocket URL, e.g. `ws://127.0.0.1:7700`. */
  url: string;
  /** The access token, when the hub requires one. Sent in `hello`, never in the URL. */
  token?: string;
  /** A name for the hub's logs (default `js-<random>`). */
  clientId?: string;
  /** Default: `globalThis.WebSocket` (browsers; Node ≥ 22, or 20 with `--experimental-websocket`). */
  WebSocket?: WebSocketConstructor;
  /** How long a request may wait for its answer, including for the connection (default 10 s). */
  requestTimeoutMs?: number;
  /** How often to ping; the hub closes connections silent for 60 s (default 15 s). */
  pingIntervalMs?: number;
  reconnect?: ReconnectOptions;
  /**
   * Ask for changed snapshots as deltas to the last one this connection was
   * given, on subscriptions with inline snapshots (default `true`): a few
   * changed places of a large document travel instead of all of it. The
   * client keeps that last snapshot's text per topic to apply them to, and
   * fetches whenever one does not apply.
   */
  deltas?: boolean;
  /** Told of problems that do not fail a request: bad frames from the hub, lost connections. */
  onError?: (error: HubError) => void;
}

/** Options of a `get`. */
export interface GetOptions {
  /** Answer `{notModified: true, revision}` unless the topic is newer than this. */
  ifNewerThan?: string;
}

/** Options of a `set`. */
export interface SetOptions {
  /** Compare-and-set: write only if the topic is still at this revision, else `ConflictError`. */
  expectedRevision?: string;
  /** Carried by the invalidation, so the writer can recognise its own change. */
  sourceId?: string;
}

/** Options of a `subscribe`. */
export interface SubscribeOptions {
  /** Ask the hub to carry small snapshots inside invalidations (default `true`). */
  inline?: boolean;
}

export type InvalidationHandler = (invalidation: Invalidation) => void;
export type Unsubscribe = () => Promise<void>;

/**
 * What every way of reaching a hub offers — one connection (`connectHub`)
 * or a connection shared by the tabs of an origin (`connectSharedHub`).
 * Replicas and the `@statesync/core` adapters take any of them.
 */
export interface HubClient {
  readonly status: ConnectionStatus;
  /** Why the client closed or last lost its connection. */
  readonly lastError: HubError | undefined;
  /** Calls `listener` on every status change; returns a function that stops it. */
  onStatus(listener: (status: ConnectionStatus, error?: HubError) => void): () => void;
  get<T = unknown>(topic: string, options?: GetOptions): Promise<Snapshot<T> | NotModified>;
  set(topic: string, data: unknown, options?: SetOptions): Promise<string>;
  /**
   * Invalidations of `topic` until the returned function is called. After
   * every reconnect the handler gets a catch-up invalidation with the
   * topic's current revision, since invalidations sent while disconnected
   * are lost.
   */
  subscribe(topic: string, handler: InvalidationHandler, options?: SubscribeOptions): Promise<Unsubscribe>;
  /** The hub's state, as `statesync status --json` shows it. */
  hubStatus(): Promise<HubStatus>;
  /** A replica of `topic` (not started). */
  topic<T = unknown>(topic: string, options?: ReplicaOptions<T>): Replica<T>;
  /** Closes the connection; pending requests fail with `ClosedError`. */
  close(): void;
}

interface Pending {
  resolve(message: ServerMessage): void;
  reject(error: HubError): void;
  timer: ReturnType<typeof setTimeout>;
}

interface TopicSubscription {
  handlers: Map<number, { handler: InvalidationHandler; inline: boolean }>;
  /** The `inline` flag sent on the wire. */
  inline: boolean;
}

/** Internal: a subscription with the revision the hub confirmed it at. */
export interface Subscribed {
  revision: string;
  unsubscribe: Unsubscribe;
}

const OPEN = 1;

/** Opens one reconnecting connection to a hub. See `HubClient`. */
export function connectHub(options: HubOptions): Hub {
  return new Hub(options);
}

/** One WebSocket to one hub, shared by every topic; reconnects by itself. */
export class Hub implements HubClient {
  #options: Required<Omit<HubOptions, "token" | "onError" | "reconnect">> & {
    token: string | undefined;
    onError: ((error: HubError) => void) | undefined;
  };
  #reconnect: Required<ReconnectOptions>;
  #status: ConnectionStatus = "connecting";
  #lastError: HubError | undefined;
  #socket: WebSocketLike | undefined;
  #nextId = 1;
  #nextHandler = 1;
  #pending = new Map<number, Pending>();
  #topics = new Map<string, TopicSubscription>();
  #statusListeners = new Set<(status: ConnectionStatus, error?: HubError) => void>();
  #liveWaiters = new Set<{ resolve(): void; reject(error: HubError): void }>();
  #attempt = 0;
  #timers = new Set<ReturnType<typeof setTimeout>>();
  #pingTimer: ReturnType<typeof setInterval> | undefined;
  #everLive = false;
  /** Per topic with deltas: the newest snapshot this connection was given, as sent. */
  #bases = new Map<string, BaseText>();

  constructor(options: HubOptions) {
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WebSocketImpl) {
      throw new HubError(
        "internal",
        "no WebSocket: pass `WebSocket` in the options (Node 20 needs --experimental-websocket or the `ws` package)",
      );
    }
    this.#options = {
      url: options.url,
      token: options.token,
      clientId: options.clientId ?? `js-${Math.random().toString(36).slice(2, 10)}`,
      WebSocket: WebSocketImpl,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      pingIntervalMs: options.pingIntervalMs ?? 15_000,
      deltas: options.deltas ?? true,
      onError: options.onError,
    };
    this.#reconnect = {
      initialDelayMs: options.reconnect?.initialDelayMs ?? 250,
      maxDelayMs: options.reconnect?.maxDelayMs ?? 10_000,
      maxAttempts: options.reconnect?.maxAttempts ?? Number.POSITIVE_INFINITY,
    };
    this.#connect();
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

  async get<T = unknown>(topic: string, options: GetOptions = {}): Promise<Snapshot<T> | NotModified> {
    const answer = await this.#request({ type: "get", topic, ifNewerThan: options.ifNewerThan });
    if (answer.type === "snapshot") return { revision: answer.revision, data: answer.data as T };
    if (answer.type === "notModified") return { notModified: true, revision: answer.revision };
    throw unexpected(answer);
  }

  async set(topic: string, data: unknown, options: SetOptions = {}): Promise<string> {
    if (data === undefined) throw new HubError("bad_request", "`data` is undefined: JSON has no such value");
    const answer = await this.#request({
      type: "set",
      topic,
      data,
      expectedRevision: options.expectedRevision,
      sourceId: options.sourceId,
    });
    if (answer.type === "ok" && answer.revision !== undefined) return answer.revision;
    if (answer.type === "conflict") throw new ConflictError(topic, answer.currentRevision);
    throw unexpected(answer);
  }

  async subscribe(topic: string, handler: InvalidationHandler, options: SubscribeOptions = {}): Promise<Unsubscribe> {
    return (await this.subscribeAt(topic, handler, options)).unsubscribe;
  }

  /** Internal (used by shared tabs): `subscribe`, with the confirmed revision. */
  async subscribeAt(topic: string, handler: InvalidationHandler, options: SubscribeOptions = {}): Promise<Subscribed> {
    const inline = options.inline ?? true;
    let entry = this.#topics.get(topic);
    if (!entry) {
      entry = { handlers: new Map(), inline };
      this.#topics.set(topic, entry);
    }
    const key = this.#nextHandler++;
    entry.handlers.set(key, { handler, inline });
    const unsubscribe: Unsubscribe = async () => {
      const current = this.#topics.get(topic);
      if (!current?.handlers.delete(key) || current.handlers.size > 0) return;
      this.#topics.delete(topic);
      this.#bases.delete(topic);
      if (this.#status === "live") {
        await this.#request({ type: "unsubscribe", topic }).catch(() => undefined);
      }
    };
    try {
      // Subscribing again is harmless and answers the current revision.
      entry.inline = entry.inline || inline;
      const answer = await this.#request(this.#subscription(topic, entry));
      if (answer.type !== "subscribed") throw unexpected(answer);
      return { revision: answer.revision, unsubscribe };
    } catch (error) {
      entry.handlers.delete(key);
      if (entry.handlers.size === 0 && this.#topics.get(topic) === entry) this.#topics.delete(topic);
      throw error;
    }
  }

  async hubStatus(): Promise<HubStatus> {
    const answer = await this.#request({ type: "status" });
    if (answer.type === "status") return answer.status;
    throw unexpected(answer);
  }

  topic<T = unknown>(topic: string, options?: ReplicaOptions<T>): Replica<T> {
    return new Replica<T>(this, topic, options);
  }

  close(): void {
    this.#close(new ClosedError());
  }

  // --- connection ---------------------------------------------------------

  #connect(): void {
    if (this.#status === "closed") return;
    let socket: WebSocketLike;
    try {
      socket = new this.#options.WebSocket(this.#options.url);
    } catch (error) {
      this.#lost(new HubError("disconnected", `cannot open ${this.#options.url}: ${String(error)}`));
      return;
    }
    this.#socket = socket;
    // Bases belong to a connection: the hub's record of them starts anew.
    this.#bases.clear();
    let welcomed = false;
    const handshake = this.#later(() => {
      if (!welcomed) {
        this.#report(new TimeoutError(this.#options.requestTimeoutMs));
        socket.close();
      }
    }, this.#options.requestTimeoutMs);
    socket.onopen = () => {
      const hello: Record<string, unknown> = {
        type: "hello",
        version: PROTOCOL_VERSION,
        clientId: this.#options.clientId,
      };
      if (this.#options.token !== undefined) hello.token = this.#options.token;
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = (event) => {
      if (this.#socket !== socket) return;
      const message = this.#decode(event.data);
      if (!message) return;
      const text = event.data as string;
      if (!welcomed) {
        if (message.type === "welcome") {
          welcomed = true;
          this.#cancel(handshake);
          this.#welcomed();
        } else if (message.type === "error") {
          this.#refused(message.code, message.message);
        }
        return;
      }
      this.#dispatch(message, text);
    };
    // Some WebSocket implementations (Node 20's) fire only `error` when the
    // connection cannot be made: either event ends this socket, once.
    let ended = false;
    const end = (error: HubError) => {
      if (ended) return;
      ended = true;
      this.#cancel(handshake);
      if (this.#socket !== socket) return;
      this.#socket = undefined;
      try {
        socket.close();
      } catch {
        // Not open.
      }
      this.#lost(error);
    };
    socket.onerror = () => end(new DisconnectedError(`cannot reach the hub at ${this.#options.url}`));
    socket.onclose = (event) => {
      const reason = event.reason ? `: ${event.reason}` : "";
      end(new DisconnectedError(`the connection to the hub closed (code ${event.code ?? "?"}${reason})`));
    };
  }

  #welcomed(): void {
    this.#attempt = 0;
    const catchUp = this.#everLive;
    this.#everLive = true;
    this.#setStatus("live");
    for (const waiter of this.#liveWaiters) waiter.resolve();
    this.#liveWaiters.clear();
    this.#startPing();
    // Resubscribe; after a reconnect, tell every handler where the topic is now.
    for (const [topic, entry] of this.#topics) {
      this.#request(this.#subscription(topic, entry))
        .then((answer) => {
          if (answer.type !== "subscribed") throw unexpected(answer);
          if (catchUp) this.#deliver({ topic, revision: answer.revision });
        })
        .catch((error: HubError) => this.#report(error));
    }
  }

  #refused(code: string, message: string): void {
    const error = new HubError(code, message);
    if (FATAL_CODES.has(code)) {
      this.#close(error);
    } else {
      this.#report(error);
      this.#socket?.close();
    }
  }

  #lost(error: HubError): void {
    this.#stopPing();
    this.#failPending(error);
    if (this.#status === "closed") return;
    this.#lastError = error;
    if (this.#everLive || this.#status === "live") this.#setStatus("interrupted", error);
    this.#attempt += 1;
    if (this.#attempt > this.#reconnect.maxAttempts) {
      this.#close(new ClosedError(`gave up after ${this.#reconnect.maxAttempts} attempts: ${error.message}`));
      return;
    }
    const exponential = this.#reconnect.initialDelayMs * 2 ** Math.min(this.#attempt - 1, 30);
    const capped = Math.min(this.#reconnect.maxDelayMs, exponential);
    // Full range jitter over the upper half: many clients of a restarted hub spread out.
    const delay = capped / 2 + Math.random() * (capped / 2);
    this.#later(() => this.#connect(), delay);
  }

  #close(error: HubError): void {
    if (this.#status === "closed") return;
    this.#lastError = error;
    this.#stopPing();
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    const socket = this.#socket;
    this.#socket = undefined;
    if (socket) {
      socket.onclose = null;
      socket.onmessage = null;
      try {
        socket.close(1000);
      } catch {
        // Already closed.
      }
    }
    this.#failPending(error);
    for (const waiter of this.#liveWaiters) waiter.reject(error);
    this.#liveWaiters.clear();
    this.#setStatus("closed", error);
  }

  #failPending(error: HubError): void {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const request of pending) {
      clearTimeout(request.timer);
      request.reject(error instanceof ClosedError ? error : new DisconnectedError(error.message));
    }
  }

  #setStatus(status: ConnectionStatus, error?: HubError): void {
    if (this.#status === status) return;
    this.#status = status;
    for (const listener of [...this.#statusListeners]) {
      try {
        listener(status, error);
      } catch (thrown) {
        this.#report(new HubError("internal", `a status listener threw: ${String(thrown)}`));
      }
    }
  }

  #startPing(): void {
    this.#stopPing();
    this.#pingTimer = setInterval(() => {
      // A ping that is not answered in time means a dead connection: drop it.
      this.#request({ type: "ping" }).catch((error: HubError) => {
        if (error.code === "timeout") this.#socket?.close();
      });
    }, this.#options.pingIntervalMs);
    (this.#pingTimer as { unref?: () => void }).unref?.();
  }

  #stopPing(): void {
    if (this.#pingTimer !== undefined) clearInterval(this.#pingTimer);
    this.#pingTimer = undefined;
  }

  // --- requests -----------------------------------------------------------

  async #request(message: Record<string, unknown>): Promise<ServerMessage> {
    const started = Date.now();
    if (this.#status !== "live") await this.#whenLive();
    const socket = this.#socket;
    if (!socket || socket.readyState !== OPEN) throw new DisconnectedError();
    const id = this.#nextId++;
    const remaining = Math.max(1, this.#options.requestTimeoutMs - (Date.now() - started));
    return new Promise<ServerMessage>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new TimeoutError(this.#options.requestTimeoutMs));
      }, remaining);
      this.#pending.set(id, { resolve, reject, timer });
      try {
        socket.send(JSON.stringify({ ...message, id }));
      } catch (error) {
        clearTimeout(timer);
        this.#pending.delete(id);
        reject(new DisconnectedError(`cannot send: ${String(error)}`));
      }
    });
  }

  #whenLive(): Promise<void> {
    if (this.#status === "closed") return Promise.reject(this.#lastError ?? new ClosedError());
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error: HubError) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        this.#liveWaiters.delete(waiter);
        reject(
          new HubError(
            "timeout",
            `not connected to the hub within ${this.#options.requestTimeoutMs} ms` +
              (this.#lastError ? ` (${this.#lastError.message})` : ""),
          ),
        );
      }, this.#options.requestTimeoutMs);
      this.#liveWaiters.add(waiter);
    });
  }

  #decode(data: unknown): ServerMessage | undefined {
    if (typeof data !== "string") {
      this.#report(new ProtocolError("the hub sent a binary frame; the protocol uses text frames"));
      return undefined;
    }
    let message: unknown;
    try {
      message = JSON.parse(data);
    } catch {
      this.#report(new ProtocolError(`the hub sent a frame that is not JSON: ${data.slice(0, 80)}`));
      return undefined;
    }
    if (typeof message !== "object" || message === null || typeof (message as { type?: unknown }).type !== "string") {
      this.#report(new ProtocolError(`the hub sent a message without a type: ${data.slice(0, 80)}`));
      return undefined;
    }
    return message as ServerMessage;
  }

  /** `text`: the frame `message` was parsed from. */
  #dispatch(message: ServerMessage, text: string): void {
    switch (message.type) {
      case "invalidation": {
        if (typeof message.topic !== "string" || !isRevision(message.revision)) {
          this.#report(new ProtocolError(`malformed invalidation: ${JSON.stringify(message).slice(0, 80)}`));
          return;
        }
        const invalidation: Invalidation = { topic: message.topic, revision: message.revision };
        if (message.sourceId !== undefined) invalidation.sourceId = message.sourceId;
        const snapshot = this.#carried(message, text);
        if (snapshot) invalidation.snapshot = snapshot;
        this.#deliver(invalidation);
        return;
      }
      case "error":
        if (message.id === undefined) {
          // The hub is closing this connection and says why.
          const error = new HubError(message.code, message.message);
          if (FATAL_CODES.has(message.code)) this.#close(error);
          else this.#report(error);
          return;
        }
        this.#answer(message.id, message);
        return;
      case "snapshot":
        if (isRevision(message.revision)) this.#keepBase(message.topic, message.revision, () => rawMember(text, ["data"]));
        this.#answer(message.id, message);
        return;
      case "subscribed":
      case "notModified":
      case "ok":
      case "conflict":
      case "pong":
      case "status":
        this.#answer(message.id, message);
        return;
      default:
        this.#report(new ProtocolError(`the hub sent an unknown message type: ${(message as { type: string }).type}`));
    }
  }

  #answer(id: number, message: ServerMessage): void {
    const pending = this.#pending.get(id);
    if (!pending) return; // Timed out already.
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    if (message.type === "error") pending.reject(new HubError(message.code, message.message));
    else pending.resolve(message);
  }

  /** What `subscribe` sends for `topic`. */
  #subscription(topic: string, entry: TopicSubscription): Record<string, unknown> {
    const message: Record<string, unknown> = { type: "subscribe", topic, inline: entry.inline };
    if (entry.inline && this.#options.deltas) message.delta = true;
    return message;
  }

  /**
   * The snapshot an invalidation carries, whole or as a delta to the kept
   * base; kept as the next base. `undefined`: none, or a delta that does
   * not apply here (the handlers fetch).
   */
  #carried(message: Extract<ServerMessage, { type: "invalidation" }>, text: string): Snapshot | undefined {
    const { topic, snapshot, delta } = message;
    if (snapshot && isRevision(snapshot.revision)) {
      this.#keepBase(topic, snapshot.revision, () => rawMember(text, ["snapshot", "data"]));
      return { revision: snapshot.revision, data: snapshot.data };
    }
    if (typeof delta !== "object" || delta === null) return undefined;
    const { base, revision } = delta as { base?: unknown; revision?: unknown };
    const kept = this.#bases.get(topic);
    if (!isRevision(base) || !isRevision(revision) || kept?.revision !== base) return undefined;
    const changed = applyDelta(kept.bytes, delta);
    let data: unknown;
    try {
      data = changed === undefined ? undefined : JSON.parse(changed);
    } catch {
      data = undefined;
    }
    if (changed === undefined || data === undefined) {
      this.#report(new ProtocolError(`a delta of ${topic} to ${revision} does not apply to its base ${base}; fetching`));
      return undefined;
    }
    this.#keepBase(topic, revision, () => changed);
    return { revision, data };
  }

  /** Keeps `topic`'s snapshot text at `revision` as the base of deltas, if newer. */
  #keepBase(topic: string, revision: string, text: () => string | undefined): void {
    const entry = this.#topics.get(topic);
    if (!entry?.inline || !this.#options.deltas || !isNewer(revision, this.#bases.get(topic)?.revision)) return;
    const raw = text();
    if (raw !== undefined) this.#bases.set(topic, { revision, bytes: utf8(raw) });
  }

  #deliver(invalidation: Invalidation): void {
    const entry = this.#topics.get(invalidation.topic);
    if (!entry) return;
    for (const { handler, inline } of [...entry.handlers.values()]) {
      const event = inline || !invalidation.snapshot ? invalidation : withoutSnapshot(invalidation);
      try {
        handler(event);
      } catch (thrown) {
        this.#report(new HubError("internal", `an invalidation handler threw: ${String(thrown)}`));
      }
    }
  }

  #report(error: HubError): void {
    try {
      this.#options.onError?.(error);
    } catch {
      // A failing error hook must not stop the client.
    }
  }

  #later(callback: () => void, ms: number): ReturnType<typeof setTimeout> {
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      callback();
    }, ms);
    this.#timers.add(timer);
    return timer;
  }

  #cancel(timer: ReturnType<typeof setTimeout>): void {
    clearTimeout(timer);
    this.#timers.delete(timer);
  }
}

function withoutSnapshot(invalidation: Invalidation): Invalidation {
  const { snapshot: _, ...rest } = invalidation;
  return rest;
}

function unexpected(message: ServerMessage): HubError {
  if (message.type === "error") return new HubError(message.code, message.message);
  return new ProtocolError(`unexpected answer: ${message.type}`);
}
