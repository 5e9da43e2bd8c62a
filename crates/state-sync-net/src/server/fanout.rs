//! Fan-out: one hub subscription per topic, each invalidation encoded once
//! and handed to every connection subscribed to it, at most one pending per
//! topic and connection.

use super::*;

/// One connection's outgoing invalidation frames: the newest per topic.
pub(super) struct Connection {
    pub(super) pending: Mutex<HashMap<Topic, Pending>>,
    pub(super) wake: Notify,
}

/// An invalidation frame waiting to be written, shared by every connection
/// it goes to.
#[derive(Clone)]
pub(super) struct Pending {
    pub(super) frame: Bytes,
    /// Bytes of snapshot data the frame carries (0: none).
    pub(super) inlined: usize,
}

impl Connection {
    /// Called inside the hub's publish: never blocks.
    pub(super) fn push(&self, topic: &Topic, pending: Pending, counters: &Counters) {
        let replaced = lock(&self.pending).insert(topic.clone(), pending).is_some();
        if replaced {
            counters
                .invalidations_coalesced
                .fetch_add(1, Ordering::Relaxed);
            crate::metrics::invalidation_coalesced();
        }
        self.wake.notify_one();
    }
}

/// A connection subscribed to a topic, and whether it asked for inline
/// snapshots.
pub(super) struct Member {
    pub(super) connection: Arc<Connection>,
    pub(super) inline: bool,
}

pub(super) type Members = Arc<Mutex<HashMap<u64, Member>>>;

/// The server's subscription to one topic: each invalidation is encoded
/// once and its frame handed to every connection subscribed to the topic.
pub(super) struct Fanout {
    pub(super) members: Members,
    pub(super) _subscription: Subscription,
}

impl Shared {
    /// Subscribes `connection` to `topic`'s invalidations.
    pub(super) async fn join(
        &self,
        topic: &Topic,
        id: u64,
        member: Member,
    ) -> Result<(), state_sync::BoxError> {
        if let Some(fanout) = lock(&self.fanouts).get(topic) {
            lock(&fanout.members).insert(id, member);
            return Ok(());
        }
        let members: Members = Arc::default();
        let sink = {
            let members = members.clone();
            let counters = self.counters.clone();
            let hub = self.hub.clone();
            // Never past the snapshot limit, which keeps frames in bounds.
            let inline_max = self
                .config
                .inline_snapshot_max_bytes
                .min(self.config.max_snapshot_bytes);
            InvalidationSink::from_fn(topic.clone(), move |event| {
                let source_id = event.source_id.as_deref();
                let plain = || Pending {
                    frame: protocol::encode_invalidation(
                        &event.topic,
                        event.revision,
                        source_id,
                        None,
                    ),
                    inlined: 0,
                };
                // The current snapshot: at this revision or newer, as a
                // batch of commits is announced one by one.
                let with_snapshot = || match hub.get_json(&event.topic) {
                    Ok(s) if s.revision >= event.revision && s.data.len() <= inline_max => {
                        Pending {
                            frame: protocol::encode_invalidation(
                                &event.topic,
                                event.revision,
                                source_id,
                                Some((s.revision, &s.data)),
                            ),
                            inlined: s.data.len(),
                        }
                    }
                    _ => plain(),
                };
                let (mut plain_frame, mut inline_frame) = (None, None);
                for member in lock(&members).values() {
                    let frame = if member.inline {
                        &mut inline_frame
                    } else {
                        &mut plain_frame
                    };
                    let pending = frame.get_or_insert_with(|| {
                        counters
                            .invalidation_frames_encoded
                            .fetch_add(1, Ordering::Relaxed);
                        if member.inline {
                            with_snapshot()
                        } else {
                            plain()
                        }
                    });
                    member
                        .connection
                        .push(&event.topic, pending.clone(), &counters);
                }
            })
        };
        let subscription = self.hub.subscribe(topic, sink).await?;
        // Another connection may have joined meanwhile: keep its fanout.
        let mut fanouts = lock(&self.fanouts);
        let fanout = fanouts.entry(topic.clone()).or_insert(Fanout {
            members,
            _subscription: subscription,
        });
        lock(&fanout.members).insert(id, member);
        Ok(())
    }

    /// Unsubscribes connection `id` from `topic`; the last one out ends the
    /// server's hub subscription.
    pub(super) fn leave(&self, topic: &Topic, id: u64) {
        let emptied = {
            let mut fanouts = lock(&self.fanouts);
            let now_empty = fanouts.get(topic).is_some_and(|fanout| {
                let mut members = lock(&fanout.members);
                members.remove(&id);
                members.is_empty()
            });
            if now_empty {
                fanouts.remove(topic)
            } else {
                None
            }
        };
        // Unsubscribe from the hub outside our lock.
        drop(emptied);
    }
}
