import type { HubClient, Unsubscribe } from "./hub.js";
import type { InvalidationEvent, Snapshot } from "./protocol.js";
import { isNewer } from "./revision.js";

/**
 * The subscriber shape `@statesync/core`'s `createRevisionSync` takes
 * (declared here by its structure; this package does not depend on it).
 */
export interface InvalidationSubscriber {
  subscribe(handler: (event: InvalidationEvent) => void): Promise<() => void>;
}

/** The provider shape `@statesync/core`'s `createRevisionSync` takes. */
export interface SnapshotProvider<T = unknown> {
  getSnapshot(): Promise<Snapshot<T>>;
}

/** A subscriber and a provider for one topic, sharing the inline snapshots. */
export interface HubSource<T = unknown> {
  subscriber: InvalidationSubscriber;
  provider: SnapshotProvider<T>;
}

/**
 * A drop-in subscriber and provider for `@statesync/core` on one topic of a
 * hub:
 *
 * ```js
 * const { subscriber, provider } = createHubSource(hub, 'settings');
 * const handle = createRevisionSync({ topic: 'settings', subscriber, provider, applier });
 * ```
 *
 * The subscriber hands the engine `{topic, revision, sourceId?}`, plus a
 * catch-up invalidation after every reconnect. The provider answers from
 * the snapshot the last invalidation carried when it is current, and asks
 * the hub otherwise.
 */
export function createHubSource<T = unknown>(hub: HubClient, topic: string, options: { inline?: boolean } = {}): HubSource<T> {
  let inlined: Snapshot<T> | undefined;
  let announced: string | undefined;
  return {
    subscriber: {
      async subscribe(handler) {
        const unsubscribe: Unsubscribe = await hub.subscribe(
          topic,
          (invalidation) => {
            if (isNewer(invalidation.revision, announced)) announced = invalidation.revision;
            const snapshot = invalidation.snapshot as Snapshot<T> | undefined;
            if (snapshot && isNewer(snapshot.revision, inlined?.revision)) inlined = snapshot;
            const event: InvalidationEvent = { topic: invalidation.topic, revision: invalidation.revision };
            if (invalidation.sourceId !== undefined) event.sourceId = invalidation.sourceId;
            handler(event);
          },
          { inline: options.inline ?? true },
        );
        return () => {
          void unsubscribe();
        };
      },
    },
    provider: {
      async getSnapshot() {
        if (inlined && !isNewer(announced ?? "0", inlined.revision)) return inlined;
        const answer = await hub.get<T>(topic);
        if ("notModified" in answer) throw new Error("not modified without a revision");
        return answer;
      },
    },
  };
}

/** Only the subscriber of `createHubSource` (no inline snapshots asked). */
export function createHubSubscriber(hub: HubClient, topic: string): InvalidationSubscriber {
  return createHubSource(hub, topic, { inline: false }).subscriber;
}

/** Only a provider: every `getSnapshot` asks the hub. */
export function createHubProvider<T = unknown>(hub: HubClient, topic: string): SnapshotProvider<T> {
  return {
    async getSnapshot() {
      const answer = await hub.get<T>(topic);
      if ("notModified" in answer) throw new Error("not modified without a revision");
      return answer;
    },
  };
}
