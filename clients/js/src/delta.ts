/**
 * Deltas (docs/PROTOCOL.md, "Deltas"): a snapshot sent as splices of the
 * JSON text of the last one the connection was given. Offsets are bytes of
 * UTF-8, so the text is kept as bytes, exactly as the hub sent it: the
 * text `JSON.stringify` would make of the parsed value may differ (key
 * order, escapes, number forms), and a splice made on other text would
 * yield another document.
 */

// Made at first use: loading the package has no side effects, and works
// where these are missing until a delta arrives.
let codecs: { encoder: TextEncoder; decoder: TextDecoder } | undefined;
const utf8Codecs = () => (codecs ??= { encoder: new TextEncoder(), decoder: new TextDecoder("utf-8", { fatal: true }) });

/** The JSON text of a snapshot, as the hub sent it, and its revision. */
export interface BaseText {
  revision: string;
  bytes: Uint8Array;
}

/** The UTF-8 bytes of `text`. */
export function utf8(text: string): Uint8Array {
  return utf8Codecs().encoder.encode(text);
}

/**
 * The text of `delta` made on `base`, or `undefined` when `base` cannot be
 * what it was made from: a wrong length, a splice out of bounds or out of
 * order, a result of another length than announced, or bytes that are not
 * UTF-8. Checked before allocating: every number comes from the peer.
 */
export function applyDelta(base: Uint8Array, delta: unknown): string | undefined {
  if (typeof delta !== "object" || delta === null) return undefined;
  const { splices, len, baseLen } = delta as { splices?: unknown; len?: unknown; baseLen?: unknown };
  if (!Array.isArray(splices) || !isLength(len) || baseLen !== base.length) return undefined;
  const { encoder, decoder } = utf8Codecs();
  const inserts: Uint8Array[] = [];
  let cursor = 0;
  let total = base.length;
  for (const splice of splices) {
    if (!Array.isArray(splice) || splice.length !== 3) return undefined;
    const [at, removed, inserted] = splice as unknown[];
    if (!isLength(at) || !isLength(removed) || typeof inserted !== "string") return undefined;
    if (at < cursor || at + removed > base.length) return undefined;
    const bytes = encoder.encode(inserted);
    inserts.push(bytes);
    total += bytes.length - removed;
    cursor = at + removed;
  }
  if (total !== len) return undefined;
  const out = new Uint8Array(total);
  let written = 0;
  cursor = 0;
  splices.forEach((splice: [number, number, string], i) => {
    const [at, removed] = splice;
    const inserted = inserts[i] as Uint8Array;
    out.set(base.subarray(cursor, at), written);
    written += at - cursor;
    out.set(inserted, written);
    written += inserted.length;
    cursor = at + removed;
  });
  out.set(base.subarray(cursor), written);
  try {
    // A splice cut inside a character leaves bytes that are not UTF-8.
    return decoder.decode(out);
  } catch {
    return undefined;
  }
}

function isLength(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

/**
 * The text of the value at `path` (member names, outermost first, at least
 * one) in the JSON object `text`, exactly as written; `undefined` if there
 * is none. `text` must be valid JSON (it was parsed already). Only the
 * members before each one on the path are scanned.
 */
export function rawMember(text: string, path: readonly string[]): string | undefined {
  let span: [number, number] | undefined;
  let open = skipSpace(text, 0);
  for (const name of path) {
    if (text[open] !== "{") return undefined;
    span = findMember(text, open, name);
    if (!span) return undefined;
    open = span[0];
  }
  return span && text.slice(span[0], span[1]);
}

/** The span of member `name`'s value in the object that opens at `open`. */
function findMember(text: string, open: number, name: string): [number, number] | undefined {
  let i = skipSpace(text, open + 1);
  while (text[i] === '"') {
    const nameEnd = stringEnd(text, i);
    const key: unknown = JSON.parse(text.slice(i, nameEnd));
    // Past the colon.
    const value = skipSpace(text, skipSpace(text, nameEnd) + 1);
    const end = valueEnd(text, value);
    if (key === name) return [value, end];
    i = skipSpace(text, end);
    if (text[i] !== ",") return undefined;
    i = skipSpace(text, i + 1);
  }
  return undefined;
}

const SPACE = /[ \t\n\r]*/y;
const STRING_REST = /(?:[^"\\]|\\.)*"/y;
const NESTING = /[{}[\]"]/g;
const SCALAR_END = /[,}\] \t\n\r]|$/g;

function skipSpace(text: string, at: number): number {
  SPACE.lastIndex = at;
  SPACE.test(text);
  return SPACE.lastIndex;
}

/** Past the string whose opening quote is at `open`. */
function stringEnd(text: string, open: number): number {
  STRING_REST.lastIndex = open + 1;
  return STRING_REST.test(text) ? STRING_REST.lastIndex : text.length;
}

/** Past the value that starts at `start`. */
function valueEnd(text: string, start: number): number {
  const first = text[start];
  if (first === '"') return stringEnd(text, start);
  if (first === "{" || first === "[") {
    let depth = 0;
    NESTING.lastIndex = start;
    for (let match = NESTING.exec(text); match; match = NESTING.exec(text)) {
      const at = match.index;
      const c = match[0];
      if (c === '"') {
        NESTING.lastIndex = stringEnd(text, at);
      } else if (c === "{" || c === "[") {
        depth += 1;
      } else {
        depth -= 1;
        if (depth === 0) return at + 1;
      }
    }
    return text.length;
  }
  SCALAR_END.lastIndex = start;
  return SCALAR_END.exec(text)?.index ?? text.length;
}
