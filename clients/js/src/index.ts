/**
 * A client for state-sync hubs (`statesync serve --ws`), for browsers and
 * Node: one reconnecting WebSocket per hub shared by every topic, typed
 * errors, a drop-in subscriber and provider for `@statesync/core`,
 * standalone replicas with a revision gate, and browser tabs that share
 * one connection.
 *
 * @packageDocumentation
 */
export { connectHub, Hub } from "./hub.js";
export type {
  ConnectionStatus,
  GetOptions,
  HubClient,
  HubOptions,
  InvalidationHandler,
  ReconnectOptions,
  SetOptions,
  SubscribeOptions,
  Unsubscribe,
  WebSocketConstructor,
  WebSocketLike,
} from "./hub.js";
export { connectSharedHub } from "./tabs.js";
export type { SharedHubClient, SharedHubOptions } from "./tabs.js";
export { Replica } from "./replica.js";
export type { ErrorPhase, ReplicaError, ReplicaOptions, UpdateOptions } from "./replica.js";
export { createHubProvider, createHubSource, createHubSubscriber } from "./statesync-core.js";
export type { HubSource, InvalidationSubscriber, SnapshotProvider } from "./statesync-core.js";
export {
  ClosedError,
  ConflictError,
  DisconnectedError,
  HubError,
  ProtocolError,
  TimeoutError,
} from "./errors.js";
export type { ErrorCode } from "./errors.js";
export { PROTOCOL_VERSION } from "./protocol.js";
export type {
  HubStatus,
  Invalidation,
  InvalidationEvent,
  NotModified,
  Snapshot,
  TopicStatus,
} from "./protocol.js";
export { compareRevisions, isNewer, isRevision } from "./revision.js";
