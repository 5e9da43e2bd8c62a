// Checks guest-js/listen.js against stand-ins for Tauri's `invoke` and
// `Channel`: the commands it invokes, and the shape handlers receive.
import assert from 'node:assert/strict';
import { stateSyncListen } from '../../guest-js/listen.js';

class Channel {
  constructor() { this.onmessage = () => {}; }
}
const calls = [];
let opened;
async function invoke(command, args) {
  calls.push([command, args]);
  if (command === 'plugin:state-sync|listen') {
    opened = args.onEvent;
    return 7;
  }
  return true;
}

const listen = stateSyncListen({ invoke, Channel });
const received = [];
const unlisten = await listen('state-sync:invalidation', (event) => received.push(event));
assert.equal(calls[0][0], 'plugin:state-sync|listen');
assert.ok(opened instanceof Channel);

opened.onmessage({ topic: 'settings', revision: '3', sourceId: 'prefs' });
assert.deepEqual(received, [{
  event: 'state-sync:invalidation',
  id: 7,
  payload: { topic: 'settings', revision: '3', sourceId: 'prefs' },
}]);

unlisten();
assert.deepEqual(calls[1], ['plugin:state-sync|unlisten', { id: 7 }]);
console.log('ok');
