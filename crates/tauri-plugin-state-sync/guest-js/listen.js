// A drop-in for Tauri's `listen`, for @statesync/tauri's
// `createTauriInvalidationSubscriber({ listen, ... })`.
//
// Invalidations arrive through an IPC channel that the plugin fills only
// with topics this window may read. Tauri's own `listen` receives every
// event of every window, so the plugin never emits a topic limited to some
// windows as an event: follow such topics through this `listen`.
//
//   import { Channel, invoke } from '@tauri-apps/api/core';
//   import { stateSyncListen } from './listen.js';
//   const listen = stateSyncListen({ invoke, Channel });
//
// The returned function has Tauri's shape: `listen(eventName, handler)`
// resolves to an `unlisten` function; `handler` receives
// `{ event, id, payload }` with `payload` = `{ topic, revision, sourceId? }`.

/**
 * @param {{ invoke: Function, Channel: Function }} tauri
 *   `invoke` and `Channel` from `@tauri-apps/api/core`
 * @returns {(eventName: string, handler: Function) => Promise<() => void>}
 */
export function stateSyncListen({ invoke, Channel }) {
  return async function listen(eventName, handler) {
    const channel = new Channel();
    let id = 0;
    channel.onmessage = (payload) => handler({ event: eventName, id, payload });
    id = await invoke('plugin:state-sync|listen', { onEvent: channel });
    return () => {
      invoke('plugin:state-sync|unlisten', { id }).catch(() => {});
    };
  };
}
