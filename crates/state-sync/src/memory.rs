//! [`MemorySource`]: a source of truth for one topic inside one process.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::lock;

use crate::error::BoxError;
use crate::protocol::{InvalidationEvent, SnapshotEnvelope};
use crate::provider::{FetchError, FetchRequest, Fetched, Provider};
use crate::revision::Revision;
use crate::subscriber::{InvalidationSink, Subscriber, Subscription};
use crate::topic::Topic;

/// A source of truth for one topic, in memory: each [`publish`](Self::publish)
/// bumps the revision by one and invalidates every subscribed handle.
///
/// It is both the [`Subscriber`] and the [`Provider`] for in-process
/// replicas, and answers conditional fetches with
/// [`Fetched::NotModified`]. Cheap to clone; clones share the state.
///
/// Data is cloned into each fetch; wrap large states in an `Arc`.
///
/// For many topics, storage, compare-and-set and typed JSON access, use the
/// hub (`state-sync-hub`), which keeps each topic's state in a
/// `MemorySource`.
///
/// # Examples
///
/// ```
/// use state_sync::{MemorySource, Revision, Topic};
///
/// let source = MemorySource::new(Topic::new("settings")?, String::from("light"));
/// assert_eq!(source.revision(), Revision::ZERO);
/// assert_eq!(source.publish("dark".into()), Revision::new(1));
/// assert_eq!(source.snapshot().data, "dark");
/// # Ok::<(), state_sync::InvalidTopic>(())
/// ```
pub struct MemorySource<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    topic: Topic,
    /// Read by every fetch, written by publishes: readers share it.
    state: RwLock<SnapshotEnvelope<T>>,
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
}

/// The subscribed sinks, and where each is in the list, so that ending a
/// subscription costs the same however many there are.
#[derive(Default)]
struct Subscribers {
    /// Copied on write only while a publish is delivering from it, so a
    /// publish takes the list without allocating.
    sinks: Arc<Vec<(u64, InvalidationSink)>>,
    at: HashMap<u64, usize>,
}

impl Subscribers {
    fn add(&mut self, id: u64, sink: InvalidationSink) {
        self.at.insert(id, self.sinks.len());
        Arc::make_mut(&mut self.sinks).push((id, sink));
    }

    fn remove(&mut self, id: u64) {
        let Some(at) = self.at.remove(&id) else {
            return;
        };
        let sinks = Arc::make_mut(&mut self.sinks);
        sinks.swap_remove(at);
        if let Some((moved, _)) = sinks.get(at) {
            self.at.insert(*moved, at);
        }
    }
}

impl<T> Clone for MemorySource<T> {
    fn clone(&self) -> Self {
        MemorySource {
            inner: self.inner.clone(),
        }
    }
}

/// The topic asked for is not the one this source holds.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown topic `{asked}` (this source holds `{held}`)")]
pub struct UnknownTopic {
    asked: Topic,
    held: Topic,
}

/// [`MemorySource::publish_at`] was given a revision that is not newer than
/// the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revision {offered} is not newer than the current revision {current}")]
pub struct RevisionNotNewer {
    /// The source's revision.
    pub current: Revision,
    /// The revision offered.
    pub offered: Revision,
}

impl<T: Clone + Send + Sync + 'static> MemorySource<T> {
    /// A source at revision `0` holding `initial`.
    pub fn new(topic: Topic, initial: T) -> Self {
        Self::starting_at(topic, Revision::ZERO, initial)
    }

    /// A source at `revision` holding `initial`: for sources restored from
    /// storage, or whose revisions must stay above an earlier run's.
    pub fn starting_at(topic: Topic, revision: Revision, initial: T) -> Self {
        MemorySource {
            inner: Arc::new(Inner {
                topic,
                state: RwLock::new(SnapshotEnvelope::new(revision, initial)),
                subscribers: Mutex::default(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        &self.inner.topic
    }

    /// The current revision.
    #[must_use]
    pub fn revision(&self) -> Revision {
        read(&self.inner.state).revision
    }

    /// The current snapshot.
    #[must_use]
    pub fn snapshot(&self) -> SnapshotEnvelope<T> {
        read(&self.inner.state).clone()
    }

    /// Replaces the state; returns the new revision.
    pub fn publish(&self, data: T) -> Revision {
        self.commit(None, |_| data)
    }

    /// Replaces the state on behalf of `source_id`, which the invalidation
    /// carries (so that writer can skip its own change).
    pub fn publish_from(&self, source_id: impl Into<String>, data: T) -> Revision {
        self.commit(Some(source_id.into()), |_| data)
    }

    /// Computes the new state from the current one, atomically with respect
    /// to other writers; returns the new revision.
    pub fn update(&self, f: impl FnOnce(&T) -> T) -> Revision {
        self.commit(None, f)
    }

    /// Replaces the state with `data` at exactly `revision` (which must be
    /// newer than the current one) and sends one invalidation carrying
    /// `source_id`. For sources that assign revisions themselves.
    ///
    /// # Errors
    ///
    /// [`RevisionNotNewer`] when `revision` is not newer; nothing changes.
    pub fn publish_at(
        &self,
        revision: Revision,
        source_id: Option<String>,
        data: T,
    ) -> Result<(), RevisionNotNewer> {
        self.publish_commits(data, [(revision, source_id)])
    }

    /// Replaces the state with `data`, the result of several commits made
    /// at once (a batch): `commits` lists each commit's revision and writer
    /// in increasing order, the last one being `data`'s revision. Every
    /// commit gets its own invalidation, in order, so each writer's
    /// `source_id` is reported.
    ///
    /// # Errors
    ///
    /// [`RevisionNotNewer`] when the revisions are not increasing and newer
    /// than the current one; nothing changes. Nothing happens for an empty
    /// `commits`.
    pub fn publish_commits(
        &self,
        data: T,
        commits: impl IntoIterator<Item = (Revision, Option<String>)>,
    ) -> Result<(), RevisionNotNewer> {
        let commits: Vec<_> = commits.into_iter().collect();
        let Some(&(last, _)) = commits.last() else {
            return Ok(());
        };
        {
            let mut state = write(&self.inner.state);
            let mut previous = state.revision;
            for &(revision, _) in &commits {
                if revision <= previous {
                    return Err(RevisionNotNewer {
                        current: previous,
                        offered: revision,
                    });
                }
                previous = revision;
            }
            *state = SnapshotEnvelope::new(last, data);
        }
        for (revision, source_id) in commits {
            self.invalidate(revision, source_id);
        }
        Ok(())
    }

    /// Number of live subscriptions.
    #[must_use]
    pub fn subscriber_count(&self) -> usize {
        lock(&self.inner.subscribers).sinks.len()
    }

    fn commit(&self, source_id: Option<String>, f: impl FnOnce(&T) -> T) -> Revision {
        let revision = {
            let mut state = write(&self.inner.state);
            let data = f(&state.data);
            *state = SnapshotEnvelope::new(state.revision.next(), data);
            state.revision
        };
        self.invalidate(revision, source_id);
        revision
    }

    fn invalidate(&self, revision: Revision, source_id: Option<String>) {
        let event = InvalidationEvent {
            topic: self.inner.topic.clone(),
            revision,
            source_id,
            timestamp_ms: None,
        };
        // Deliver outside every lock: sinks may run user filters.
        let sinks = lock(&self.inner.subscribers).sinks.clone();
        for (_, sink) in sinks.iter() {
            sink.deliver(&event);
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Subscriber for MemorySource<T> {
    fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> impl Future<Output = Result<Subscription, BoxError>> + Send {
        let result = if topic.matches(&self.inner.topic) {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            lock(&self.inner.subscribers).add(id, sink);
            let weak = Arc::downgrade(&self.inner);
            Ok(Subscription::new(move || {
                if let Some(inner) = weak.upgrade() {
                    lock(&inner.subscribers).remove(id);
                }
            }))
        } else {
            Err(UnknownTopic {
                asked: topic.clone(),
                held: self.inner.topic.clone(),
            }
            .into())
        };
        std::future::ready(result)
    }
}

impl<T: Clone + Send + Sync + 'static> crate::Source for MemorySource<T> {
    fn topic(&self) -> &Topic {
        &self.inner.topic
    }
}

impl<T: Clone + Send + Sync + 'static> Provider for MemorySource<T> {
    type Data = T;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<T>, FetchError>> + Send {
        let result = self.fetch_now(request).ok_or_else(|| {
            FetchError::unavailable(UnknownTopic {
                asked: request.topic.clone(),
                held: self.inner.topic.clone(),
            })
        });
        std::future::ready(result)
    }

    /// Always answers, except for another topic (which `fetch` reports).
    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<T>> {
        if !request.topic.matches(&self.inner.topic) {
            return None;
        }
        let state = read(&self.inner.state);
        Some(match request.if_newer_than {
            Some(known) if known >= state.revision => Fetched::NotModified {
                revision: state.revision,
            },
            _ => Fetched::Snapshot(state.clone()),
        })
    }
}

impl<T> fmt::Debug for MemorySource<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySource")
            .field("topic", &self.inner.topic)
            .field("revision", &read(&self.inner.state).revision)
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn subscriptions_end_in_any_order_and_only_the_live_ones_hear_publishes() {
        let topic = Topic::new("t").unwrap();
        let source = MemorySource::new(topic.clone(), 0u32);
        let heard: Vec<Arc<AtomicUsize>> = (0..6).map(|_| Arc::default()).collect();
        let mut subscriptions: Vec<Option<Subscription>> = heard
            .iter()
            .map(|count| {
                let count = count.clone();
                let sink = InvalidationSink::from_fn(topic.clone(), move |_| {
                    count.fetch_add(1, Ordering::Relaxed);
                });
                Some(futures::executor::block_on(source.subscribe(&topic, sink)).unwrap())
            })
            .collect();
        // The first, the last and one in the middle: each removal moves
        // another subscription into its place.
        for ended in [0, 5, 2] {
            subscriptions[ended] = None;
        }
        assert_eq!(source.subscriber_count(), 3);
        source.publish(1);
        let counts: Vec<usize> = heard.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, [0, 1, 0, 1, 1, 0]);
        subscriptions.clear();
        assert_eq!(source.subscriber_count(), 0);
        source.publish(2);
        let total: usize = heard.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 3);
    }
}
