/** Error codes a hub sends (docs/PROTOCOL.md), plus the client's own. */
export type ErrorCode =
  | "bad_request"
  | "unknown_message"
  | "not_authenticated"
  | "unsupported_version"
  | "unauthorized"
  | "forbidden"
  | "invalid_topic"
  | "unknown_topic"
  | "invalid_revision"
  | "too_large"
  | "invalid_data"
  | "storage"
  | "damaged"
  | "too_many_topics"
  | "too_many_connections"
  | "shutting_down"
  | "idle_timeout"
  | "internal"
  | "conflict"
  | "disconnected"
  | "timeout"
  | "closed"
  | "protocol";

/** Every error this package throws or reports. `code` is stable. */
export class HubError extends Error {
  readonly code: ErrorCode | (string & {});

  constructor(code: ErrorCode | (string & {}), message: string) {
    super(message);
    this.name = "HubError";
    this.code = code;
  }
}

/** A compare-and-set found another revision; nothing was written. */
export class ConflictError extends HubError {
  /** The topic's revision now. */
  readonly currentRevision: string;
  readonly topic: string;

  constructor(topic: string, currentRevision: string) {
    super("conflict", `\`${topic}\` is at revision ${currentRevision}; nothing was written`);
    this.name = "ConflictError";
    this.topic = topic;
    this.currentRevision = currentRevision;
  }
}

/**
 * The connection dropped before the answer came. For `set`, the write may
 * or may not have been committed: read the topic to find out.
 */
export class DisconnectedError extends HubError {
  constructor(message = "the connection to the hub dropped before the answer") {
    super("disconnected", message);
    this.name = "DisconnectedError";
  }
}

/** No answer within the request timeout. */
export class TimeoutError extends HubError {
  constructor(ms: number) {
    super("timeout", `no answer from the hub within ${ms} ms`);
    this.name = "TimeoutError";
  }
}

/** The client was closed, by `close()` or because the hub refused it for good. */
export class ClosedError extends HubError {
  constructor(message = "the hub client is closed") {
    super("closed", message);
    this.name = "ClosedError";
  }
}

/** The hub sent something this client cannot read; the connection stays. */
export class ProtocolError extends HubError {
  constructor(message: string) {
    super("protocol", message);
    this.name = "ProtocolError";
  }
}

/** Codes after which reconnecting cannot help: the client stops and says why. */
export const FATAL_CODES: ReadonlySet<string> = new Set(["unauthorized", "unsupported_version"]);

/** Plain-object form of an error, for postMessage between tabs. */
export interface ErrorShape {
  name: string;
  code: string;
  message: string;
  topic?: string;
  currentRevision?: string;
}

export function errorToShape(error: unknown): ErrorShape {
  if (error instanceof ConflictError) {
    return {
      name: error.name,
      code: error.code,
      message: error.message,
      topic: error.topic,
      currentRevision: error.currentRevision,
    };
  }
  if (error instanceof HubError) return { name: error.name, code: error.code, message: error.message };
  return { name: "HubError", code: "internal", message: String(error) };
}

export function errorFromShape(shape: ErrorShape): HubError {
  switch (shape.code) {
    case "conflict":
      return new ConflictError(shape.topic ?? "", shape.currentRevision ?? "0");
    case "disconnected":
      return new DisconnectedError(shape.message);
    case "closed":
      return new ClosedError(shape.message);
    case "protocol":
      return new ProtocolError(shape.message);
    default: {
      const error = new HubError(shape.code, shape.message);
      if (shape.code === "timeout") error.name = "TimeoutError";
      return error;
    }
  }
}
