/** The wire messages of docs/PROTOCOL.md, version 1. */

export const PROTOCOL_VERSION = 1;

/** `{revision, data}`: a topic's value at a revision. */
export interface Snapshot<T = unknown> {
  revision: string;
  data: T;
}

/** "`topic` is now at `revision`" — the shape `@statesync/core` takes. */
export interface InvalidationEvent {
  topic: string;
  revision: string;
  sourceId?: string;
}

/** An invalidation as a hub sends it: maybe with the snapshot inline. */
export interface Invalidation extends InvalidationEvent {
  snapshot?: Snapshot;
}

/**
 * A snapshot as splices of the JSON text at `base`: each `[at, removed,
 * inserted]` replaces `removed` bytes of UTF-8 from offset `at`. The new
 * text has `len` bytes, the base `baseLen`. The client turns it into a
 * whole snapshot before handlers see it.
 */
export interface SnapshotDelta {
  base: string;
  revision: string;
  splices: [number, number, string][];
  len: number;
  baseLen: number;
}

/** The answer to a conditional `get` when the topic is not newer. */
export interface NotModified {
  notModified: true;
  revision: string;
}

/** One topic in a hub's status. */
export interface TopicStatus {
  topic: string;
  revision: string;
  bytes: number;
  subscribers: number;
}

/** What `status` reports (keys the client does not know are kept). */
export interface HubStatus {
  serverId: string;
  sharedStorage: boolean;
  stale: boolean;
  topics: TopicStatus[];
  damagedTopics: string[];
  stats: { connections: number; subscriptions: number; writes: number; [key: string]: unknown };
  /** The hub process's CPU time and resident memory; absent where the platform does not tell them. */
  process?: { cpuMs: number; rssBytes: number };
}

export type ServerMessage =
  | { type: "welcome"; version: number; serverId: string }
  | { type: "invalidation"; topic: string; revision: string; sourceId?: string; snapshot?: Snapshot; delta?: SnapshotDelta }
  | { type: "subscribed"; id: number; topic: string; revision: string }
  | { type: "snapshot"; id: number; topic: string; revision: string; data: unknown }
  | { type: "notModified"; id: number; topic: string; revision: string }
  | { type: "ok"; id: number; revision?: string }
  | { type: "conflict"; id: number; topic: string; currentRevision: string }
  | { type: "pong"; id: number }
  | { type: "status"; id: number; status: HubStatus }
  | { type: "error"; id?: number; code: string; message: string };
