import { ConflictError, HubError, ProtocolError } from "./errors.js";
import type { HubClient, Unsubscribe } from "./hub.js";
import type { Invalidation, Snapshot } from "./protocol.js";
import { isNewer, isRevision } from "./revision.js";

/** Where a replica's failure happened, as in the Rust engine. */
export type ErrorPhase = "start" | "subscribe" | "get_snapshot" | "apply" | "protocol";

/** A failure the replica survived (it keeps running), with where it happened. */
export interface ReplicaError {
  phase: ErrorPhase;
  topic: string;
  error: HubError;
  /** The attempt that failed, for fetches. */
  attempt?: number;
  /** Whether another attempt follows, and after how long. */
  willRetry?: boolean;
  retryInMs?: number;
}

export interface ReplicaOptions<T> {
  /** Ask for snapshots inside invalidations, saving a fetch (default `true`). */
  inline?: boolean;
  /** Told of every failure the replica survives. */
  onError?: (error: ReplicaError) => void;
  /** Checks or converts data before it is applied; throwing rejects the snapshot (phase `apply`). */
  decode?: (data: unknown) => T;
  /** Fetch retries: attempts (default 3) and first delay (default 500 ms, ×2, capped at 10 s). */
  retry?: { attempts?: number; initialDelayMs?: number };
}

/** Options of `update`. */
export interface UpdateOptions {
  /** Compare-and-set attempts before giving up with the last `ConflictError` (default 16). */
  maxAttempts?: number;
}

type Listener<T> = (snapshot: Snapshot<T>) => void;

/**
 * A replica of one topic — the same contract as the Rust engine's
 * `SyncHandle`: it applies a snapshot only if it is newer than the one it
 * has (the revision gate), keeps at most one fetch in flight and one
 * queued however many invalidations arrive, resyncs after every
 * reconnect, and never applies after `stop()`.
 */
export class Replica<T = unknown> {
  readonly topicName: string;
  #hub: HubClient;
  #options: ReplicaOptions<T>;
  #current: Snapshot<T> | undefined;
  #listeners = new Set<Listener<T>>();
  #unsubscribe: Unsubscribe | undefined;
  #starting: Promise<Snapshot<T>> | undefined;
  #stopped = false;
  /** The newest revision the hub announced. */
  #announced: string | undefined;
  #fetching = false;
  #queued = false;

  constructor(hub: HubClient, topic: string, options: ReplicaOptions<T> = {}) {
    this.#hub = hub;
    this.topicName = topic;
    this.#options = options;
  }

  /** The last applied snapshot, if any. */
  get current(): Snapshot<T> | undefined {
    return this.#current;
  }

  /** The last applied revision, `"0"` before the first. */
  get revision(): string {
    return this.#current?.revision ?? "0";
  }

  /**
   * Subscribes, then fetches and applies the current snapshot. Idempotent;
   * concurrent calls share one start. On failure nothing stays subscribed.
   */
  start(): Promise<Snapshot<T>> {
    if (this.#stopped) return Promise.reject(new HubError("closed", "the replica was stopped"));
    this.#starting ??= this.#start().catch((error: unknown) => {
      this.#starting = undefined;
      throw error;
    });
    return this.#starting;
  }

  async #start(): Promise<Snapshot<T>> {
    const unsubscribe = await this.#hub.subscribe(this.topicName, (event) => this.#onInvalidation(event), {
      inline: this.#options.inline ?? true,
    });
    if (this.#stopped) {
      await unsubscribe();
      throw new HubError("closed", "the replica was stopped");
    }
    this.#unsubscribe = unsubscribe;
    try {
      await this.refresh();
    } catch (error) {
      this.#unsubscribe = undefined;
      await unsubscribe();
      throw error;
    }
    const current = this.#current;
    if (!current) throw new ProtocolError(`no snapshot of ${this.topicName}`);
    return current;
  }

  /** Stops: unsubscribes; nothing is applied after this. `current` stays readable. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#listeners.clear();
    const unsubscribe = this.#unsubscribe;
    this.#unsubscribe = undefined;
    await unsubscribe?.();
  }

  /** Calls `listener` with every snapshot applied from now on; returns a function that stops it. */
  subscribe(listener: Listener<T>): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Fetches the topic once (conditionally, when it has a snapshot) and applies it if newer. */
  async refresh(): Promise<void> {
    if (this.#stopped) return;
    const known = this.#current?.revision;
    const answer = await this.#hub.get<unknown>(
      this.topicName,
      known === undefined ? {} : { ifNewerThan: known },
    );
    if ("notModified" in answer) return;
    this.#apply(answer);
  }

  /** Writes `data`; with `expectedRevision`, a compare-and-set. Resolves with the new revision. */
  async set(data: T, options: { expectedRevision?: string } = {}): Promise<string> {
    const revision = await this.#hub.set(this.topicName, data, options);
    return revision;
  }

  /**
   * Compare-and-set update: `change` gets the current data and returns the
   * new data; when another writer got there first, it runs again on the
   * newer data. Resolves with the committed snapshot.
   */
  async update(change: (current: T) => T, options: UpdateOptions = {}): Promise<Snapshot<T>> {
    const attempts = options.maxAttempts ?? 16;
    let base = this.#current ?? (await this.#fetchCurrent());
    for (let attempt = 1; ; attempt++) {
      const data = change(base.data);
      try {
        const revision = await this.#hub.set(this.topicName, data, { expectedRevision: base.revision });
        return { revision, data };
      } catch (error) {
        if (!(error instanceof ConflictError) || attempt >= attempts) throw error;
        base = await this.#fetchCurrent();
      }
    }
  }

  async #fetchCurrent(): Promise<Snapshot<T>> {
    const answer = await this.#hub.get<unknown>(this.topicName);
    if ("notModified" in answer) throw new ProtocolError("not modified without a revision");
    this.#apply(answer);
    return { revision: answer.revision, data: this.#decode(answer.data) };
  }

  #onInvalidation(event: Invalidation): void {
    if (this.#stopped) return;
    if (!isRevision(event.revision)) {
      this.#report({ phase: "protocol", topic: this.topicName, error: new ProtocolError(`bad revision ${String(event.revision)}`) });
      return;
    }
    if (!isNewer(event.revision, this.#current?.revision)) return;
    if (event.snapshot && !isNewer(event.revision, event.snapshot.revision)) {
      // The hub sent the snapshot along: no fetch.
      this.#apply(event.snapshot);
      return;
    }
    if (isNewer(event.revision, this.#announced)) this.#announced = event.revision;
    this.#pull();
  }

  /** One fetch in flight, one queued behind it. */
  #pull(): void {
    if (this.#fetching) {
      this.#queued = true;
      return;
    }
    this.#fetching = true;
    void this.#fetchWithRetry().finally(() => {
      this.#fetching = false;
      if (this.#queued && !this.#stopped) {
        this.#queued = false;
        if (this.#announced !== undefined && isNewer(this.#announced, this.#current?.revision)) this.#pull();
      }
    });
  }

  async #fetchWithRetry(): Promise<void> {
    const attempts = this.#options.retry?.attempts ?? 3;
    let delay = this.#options.retry?.initialDelayMs ?? 500;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.refresh();
        return;
      } catch (thrown) {
        const error = thrown instanceof HubError ? thrown : new HubError("internal", String(thrown));
        const willRetry = attempt < attempts && !this.#stopped;
        this.#report({ phase: "get_snapshot", topic: this.topicName, error, attempt, willRetry, retryInMs: willRetry ? delay : 0 });
        if (!willRetry) return;
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 10_000);
      }
    }
  }

  #apply(snapshot: Snapshot): void {
    if (this.#stopped || !isNewer(snapshot.revision, this.#current?.revision)) return;
    let data: T;
    try {
      data = this.#decode(snapshot.data);
    } catch (thrown) {
      this.#report({ phase: "apply", topic: this.topicName, error: new HubError("invalid_data", String(thrown)) });
      return;
    }
    const applied = { revision: snapshot.revision, data };
    this.#current = applied;
    for (const listener of [...this.#listeners]) {
      try {
        listener(applied);
      } catch (thrown) {
        this.#report({ phase: "apply", topic: this.topicName, error: new HubError("internal", `a listener threw: ${String(thrown)}`) });
      }
    }
  }

  #decode(data: unknown): T {
    return this.#options.decode ? this.#options.decode(data) : (data as T);
  }

  #report(error: ReplicaError): void {
    try {
      this.#options.onError?.(error);
    } catch {
      // A failing error hook must not stop the replica.
    }
  }
}
