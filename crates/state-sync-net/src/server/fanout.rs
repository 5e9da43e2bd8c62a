//! Fan-out: one hub subscription per topic, each invalidation encoded once
//! and handed to every connection subscribed to it, at most one pending per
//! topic and connection.

use super::*;
use crate::TopicMap;

/// One connection's outgoing invalidation frames: the newest per topic.
pub(super) struct Connection {
    pub(super) outbox: Mutex<Outbox>,
    pub(super) wake: Notify,
    /// Set after an answer is queued: the writer, woken, looks at the
    /// answer queue only then (an empty look is a cache miss per
    /// connection on every fan-out).
    pub(super) answer_queued: AtomicBool,
    /// Set once the connection's session is over: the writer writes what
    /// is queued and closes.
    pub(super) session_ended: AtomicBool,
}

/// What waits to be written, and what was written, on one connection.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) pending: TopicMap<Pending>,
    /// Per subscribed topic: the newest snapshot handed to the writer
    /// (pushed or answered), which a delta may start from, as the client
    /// keeps the newest it was given on this connection.
    pub(super) delivered: TopicMap<Revision>,
}

/// An invalidation frame waiting to be written, shared by every connection
/// it goes to.
#[derive(Clone)]
pub(super) struct Pending {
    pub(super) frame: Bytes,
    /// Bytes of snapshot data the frame carries (0: none).
    pub(super) inlined: usize,
    /// The revision whose snapshot the frame gives the client, whole or
    /// as a delta.
    pub(super) gives: Option<Revision>,
    /// Whether the frame carries a delta.
    pub(super) delta: bool,
    /// Whether the writer records `gives` as the client's next delta base:
    /// only on subscriptions with deltas, so others pay nothing for them.
    pub(super) base_for_deltas: bool,
}

impl Connection {
    pub(super) fn new() -> Connection {
        Connection {
            outbox: Mutex::default(),
            wake: Notify::new(),
            answer_queued: AtomicBool::new(false),
            session_ended: AtomicBool::new(false),
        }
    }

    /// Called inside the hub's publish: never blocks.
    pub(super) fn push(&self, topic: &Topic, pending: Pending, counters: &Counters) {
        let replaced = lock(&self.outbox)
            .pending
            .insert(topic.clone(), pending)
            .is_some();
        self.pushed(replaced, counters);
    }

    /// Like [`Connection::push`], choosing the frame by what the client
    /// was last given: `delta` when that is its base, `full` otherwise.
    fn push_delta(
        &self,
        topic: &Topic,
        delta: Option<(Revision, &Pending)>,
        full: impl FnOnce() -> Pending,
        counters: &Counters,
    ) {
        let replaced = {
            let mut outbox = lock(&self.outbox);
            let mut pending = match delta {
                Some((base, frame)) if outbox.delivered.get(topic) == Some(&base) => frame.clone(),
                _ => full(),
            };
            pending.base_for_deltas = true;
            outbox.pending.insert(topic.clone(), pending).is_some()
        };
        self.pushed(replaced, counters);
    }

    /// Tells the writer an answer waits in its queue.
    pub(super) fn answer_queued(&self) {
        self.answer_queued.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Tells the writer the session is over.
    pub(super) fn session_ended(&self) {
        self.session_ended.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn pushed(&self, replaced: bool, counters: &Counters) {
        if replaced {
            counters
                .invalidations_coalesced
                .fetch_add(1, Ordering::Relaxed);
            crate::metrics::invalidation_coalesced();
        }
        self.wake.notify_one();
    }

    /// The frames to write now, recording what they give the client.
    pub(super) fn take_pending(&self, into: &mut Vec<Pending>) {
        let mut outbox = lock(&self.outbox);
        let Outbox { pending, delivered } = &mut *outbox;
        for (topic, frame) in pending.drain() {
            if frame.base_for_deltas
                && let Some(revision) = frame.gives
            {
                record(delivered, topic, revision);
            }
            into.push(frame);
        }
    }

    /// Records that the client was answered `topic`'s snapshot at
    /// `revision`, so a delta may start from it.
    pub(super) fn answered(&self, topic: &Topic, revision: Revision) {
        record(&mut lock(&self.outbox).delivered, topic.clone(), revision);
    }

    /// Forgets `topic`'s frames, as its subscription ends.
    pub(super) fn forget(&self, topic: &Topic) {
        let mut outbox = lock(&self.outbox);
        outbox.pending.remove(topic);
        outbox.delivered.remove(topic);
    }
}

impl Counters {
    /// Counts a delta computed in `took`, and whether it was too large to
    /// send.
    fn delta_computed(&self, took: Duration, too_large: bool) {
        self.deltas_computed.fetch_add(1, Ordering::Relaxed);
        if too_large {
            self.deltas_too_large.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.delta_micros.fetch_add(micros, Ordering::Relaxed);
        crate::metrics::delta_computed(took, too_large);
    }
}

/// The client keeps the newest snapshot it was given: so does this record.
fn record(delivered: &mut TopicMap<Revision>, topic: Topic, revision: Revision) {
    let at = delivered.entry(topic).or_insert(revision);
    *at = (*at).max(revision);
}

/// A connection subscribed to a topic, and whether it asked for inline
/// snapshots and deltas.
pub(super) struct Member {
    pub(super) connection: Arc<Connection>,
    pub(super) inline: bool,
    pub(super) delta: bool,
}

pub(super) type Members = Arc<Mutex<HashMap<u64, Member>>>;

/// A delta is sent only when it is at most this fraction of the snapshot.
const DELTA_MAX_SHARE: usize = 2;

/// After this many deltas in a row too large to send, as many revisions
/// are announced without trying one, at most.
const MAX_DELTA_SKIP: u32 = 8;

/// What the next delta of a topic starts from: the last snapshot announced
/// while some member asks for deltas. A document rewritten all over makes
/// every diff run to its deadline for nothing, so after deltas that were
/// too large the next revisions skip the diff, one more each time in a
/// row (up to [`MAX_DELTA_SKIP`]), until one pays again.
#[derive(Default)]
struct DeltaBase {
    last: Option<(Revision, Bytes)>,
    too_large_in_a_row: u32,
    skip: u32,
}

impl DeltaBase {
    /// Keeps `current` as the next base; returns the previous one if a
    /// delta from it is to be tried.
    fn advance(&mut self, current: (Revision, &Bytes)) -> Option<(Revision, Bytes)> {
        let previous = self.last.replace((current.0, current.1.clone()));
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        previous.filter(|(at, _)| *at < current.0)
    }

    fn tried(&mut self, too_large: bool) {
        if too_large {
            self.too_large_in_a_row = (self.too_large_in_a_row + 1).min(MAX_DELTA_SKIP);
            self.skip = self.too_large_in_a_row;
        } else {
            self.too_large_in_a_row = 0;
        }
    }
}

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
            let delta_base: Mutex<DeltaBase> = Mutex::default();
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
                    gives: None,
                    delta: false,
                    base_for_deltas: false,
                };
                // The current snapshot: at this revision or newer, as a
                // batch of commits is announced one by one.
                let current = hub
                    .get_json(&event.topic)
                    .ok()
                    .filter(|s| s.revision >= event.revision);
                let with_snapshot = || match current.as_ref().filter(|s| s.data.len() <= inline_max)
                {
                    Some(s) => Pending {
                        frame: protocol::encode_invalidation(
                            &event.topic,
                            event.revision,
                            source_id,
                            Some((s.revision, &s.data)),
                        ),
                        inlined: s.data.len(),
                        gives: Some(s.revision),
                        delta: false,
                        base_for_deltas: false,
                    },
                    None => plain(),
                };
                // Deltas, for the members that asked: computed once per
                // revision, outside the members' lock (a diff takes up to
                // `SnapshotDelta`'s deadline); the previous snapshot is kept
                // only while someone asks.
                let wants_delta = lock(&members).values().any(|m| m.inline && m.delta);
                let base = {
                    let mut delta_base = lock(&delta_base);
                    match &current {
                        Some(s) if wants_delta => delta_base.advance((s.revision, &s.data)),
                        _ => {
                            delta_base.last = None;
                            None
                        }
                    }
                };
                let delta = current
                    .as_ref()
                    .zip(base.as_ref())
                    .and_then(|(s, (at, old))| {
                        let old = std::str::from_utf8(old).ok()?;
                        let new = std::str::from_utf8(&s.data).ok()?;
                        let started = std::time::Instant::now();
                        let delta = protocol::SnapshotDelta::between(*at, old, s.revision, new);
                        let too_large = delta.wire_len() * DELTA_MAX_SHARE > new.len()
                            || delta.wire_len() > inline_max;
                        counters.delta_computed(started.elapsed(), too_large);
                        lock(&delta_base).tried(too_large);
                        if too_large {
                            return None;
                        }
                        counters
                            .invalidation_frames_encoded
                            .fetch_add(1, Ordering::Relaxed);
                        let frame = protocol::encode_delta_invalidation(
                            &event.topic,
                            event.revision,
                            source_id,
                            &delta,
                        );
                        Some((
                            *at,
                            Pending {
                                inlined: frame.len(),
                                frame,
                                gives: Some(s.revision),
                                delta: true,
                                base_for_deltas: true,
                            },
                        ))
                    });
                let (mut plain_frame, mut inline_frame) = (None, None);
                for member in lock(&members).values() {
                    if member.inline && member.delta {
                        let full = || {
                            inline_frame
                                .get_or_insert_with(|| {
                                    counters
                                        .invalidation_frames_encoded
                                        .fetch_add(1, Ordering::Relaxed);
                                    with_snapshot()
                                })
                                .clone()
                        };
                        member.connection.push_delta(
                            &event.topic,
                            delta.as_ref().map(|(at, p)| (*at, p)),
                            full,
                            &counters,
                        );
                        continue;
                    }
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
