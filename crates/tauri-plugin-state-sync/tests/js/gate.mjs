// A JavaScript engine implementing the state-sync contract's revision gate
// (as @statesync/core does), fed with what the plugin emitted and answered.
//
// Usage: node gate.mjs TRANSCRIPT.json
// The transcript is a list of steps: {"event": <invalidation payload>,
// "snapshot": <get_snapshot response at that moment>}, plus the initial
// snapshot. Prints a JSON summary; exits non-zero on any violation.
import { readFileSync } from 'node:fs';

const MAX = 18446744073709551615n;
const canonical = (r) => typeof r === 'string' && /^(0|[1-9][0-9]*)$/.test(r) && BigInt(r) <= MAX;
const fail = (message) => { console.error(message); process.exit(1); };

const { topic, initial, steps } = JSON.parse(readFileSync(process.argv[2], 'utf8'));
let local = null;
let state;
let fetches = 0;
const applied = [];

function apply(snapshot, first) {
  if (!canonical(snapshot.revision)) fail(`non-canonical snapshot revision ${JSON.stringify(snapshot.revision)}`);
  if (!('data' in snapshot)) fail('snapshot without data');
  const revision = BigInt(snapshot.revision);
  if (!first && local !== null && revision <= local) return; // only if newer
  local = revision;
  state = snapshot.data;
  applied.push(snapshot.revision);
}

apply(initial, true); // start: the first snapshot whatever its revision
fetches++;
for (const { event, snapshot } of steps) {
  if (typeof event.topic !== 'string' || !canonical(event.revision)) fail(`bad event ${JSON.stringify(event)}`);
  if ('sourceId' in event && typeof event.sourceId !== 'string') fail('sourceId must be a string');
  if (event.topic !== topic) continue; // other topics: ignored
  if (local !== null && BigInt(event.revision) <= local) continue; // stale: no fetch
  fetches++;
  apply(snapshot, false);
}
for (let i = 1; i < applied.length; i++) {
  if (BigInt(applied[i]) <= BigInt(applied[i - 1])) fail(`applied revisions not increasing: ${applied}`);
}
console.log(JSON.stringify({ revision: local.toString(), state, fetches, applied: applied.length }));
