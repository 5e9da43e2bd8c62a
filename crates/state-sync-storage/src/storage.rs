//! The [`Storage`] trait.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use state_sync::{Revision, Topic};

use crate::error::Result;

/// One topic's committed state: its revision and its data as JSON bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The revision of `data`.
    pub revision: Revision,
    /// The data, JSON-encoded once and shared.
    pub data: Bytes,
}

impl Record {
    /// A record.
    #[must_use]
    pub fn new(revision: Revision, data: impl Into<Bytes>) -> Self {
        Record {
            revision,
            data: data.into(),
        }
    }
}

/// The outcome of [`Storage::store_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The record is stored.
    Committed,
    /// Another writer got there first: nothing was stored, and this is the
    /// record that is stored now (`None`: none is).
    Conflict(Option<Record>),
}

/// What another writer of a shared storage did, from [`Storage::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// `topic` is now at `revision` (or later).
    Stored {
        /// The topic.
        topic: Topic,
        /// Its revision.
        revision: Revision,
    },
    /// Notifications may have been lost (the notification connection was
    /// down, or the receiver fell behind): re-read every topic of interest.
    Resync,
}

impl Change {
    /// The notification an engine carries for a commit: `"<revision>
    /// <topic>"`, never the data (PostgreSQL's NOTIFY takes at most 8 000
    /// bytes; a topic is at most 100).
    #[must_use]
    pub fn notice(topic: &Topic, revision: Revision) -> String {
        format!("{revision} {topic}")
    }

    /// Parses a [`notice`](Self::notice); `None` when it is not one.
    #[must_use]
    pub fn from_notice(payload: &str) -> Option<Change> {
        let (revision, topic) = payload.split_once(' ')?;
        Some(Change::Stored {
            topic: Topic::new(topic).ok()?,
            revision: revision.parse().ok()?,
        })
    }

    /// How a shared storage's notification listener reconnects: 100 ms
    /// doubling to 5 s, with jitter, for as long as it takes.
    #[must_use]
    pub fn listener_backoff() -> state_sync::Backoff {
        state_sync::RetryPolicy::default()
            .max_attempts(u32::MAX)
            .initial_delay(std::time::Duration::from_millis(100))
            .max_delay(std::time::Duration::from_secs(5))
            .jitter(true)
            .backoff()
    }
}

/// Where committed records live.
///
/// Backends must pass the conformance suite (the `conformance` module,
/// behind the feature of that name): a stored record is returned by `load`
/// (also after reopening, for durable backends), the latest `store` wins,
/// and topics are independent.
///
/// # Exclusive and shared storage
///
/// A storage is either *exclusive* to one hub (memory, files: the hub is
/// the only writer, so [`store_if`](Self::store_if) and `store` are the
/// same, and [`changes`](Self::changes) is `None`), or *shared* by several
/// hubs (a database). A shared storage makes [`store_if`](Self::store_if) an
/// atomic compare-and-set in the engine and reports other writers' commits
/// through [`changes`](Self::changes); the hub then follows them, so several
/// hubs on one storage behave as one.
pub trait Storage: Send + Sync + 'static {
    /// The record of `topic`, if one was stored.
    ///
    /// # Errors
    ///
    /// I/O failures; [`Error::Corrupt`](crate::Error::Corrupt) when the
    /// stored bytes fail their checksum.
    fn load(&self, topic: &Topic) -> impl Future<Output = Result<Option<Record>>> + Send;

    /// Stores `record` as the state of `topic`, replacing the previous one.
    /// When the future resolves the record is as durable as the backend's
    /// durability mode promises.
    ///
    /// # Errors
    ///
    /// I/O failures; the previous record is then still intact.
    fn store(&self, topic: &Topic, record: &Record) -> impl Future<Output = Result<()>> + Send;

    /// Removes the record of `topic`, if any (and any backup copy of it), so
    /// `load` returns `None`.
    ///
    /// # Errors
    ///
    /// I/O failures.
    fn remove(&self, topic: &Topic) -> impl Future<Output = Result<()>> + Send;

    /// Every topic with a stored record.
    ///
    /// # Errors
    ///
    /// I/O failures.
    fn topics(&self) -> impl Future<Output = Result<Vec<Topic>>> + Send;

    /// Stores `record` only if the stored revision is still `expected`
    /// (`None`: nothing is stored), atomically with respect to every other
    /// writer. The default, for exclusive storage, just stores.
    ///
    /// # Errors
    ///
    /// As for [`store`](Self::store).
    fn store_if(
        &self,
        topic: &Topic,
        expected: Option<Revision>,
        record: &Record,
    ) -> impl Future<Output = Result<Stored>> + Send {
        let _ = expected;
        async move { self.store(topic, record).await.map(|()| Stored::Committed) }
    }

    /// Other writers' commits, for a shared storage; `None` (the default)
    /// for exclusive storage. Each call is a new receiver.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Any [`Storage`] behind one type, for code that should not be generic
/// over its backend (a hub, a cache). Cheap to clone; clones share the
/// backend.
///
/// # Examples
///
/// ```
/// use state_sync_storage::{AnyStorage, MemoryStorage};
///
/// let storage = AnyStorage::new(MemoryStorage::new());
/// # let _ = storage;
/// ```
#[derive(Clone)]
pub struct AnyStorage(Arc<dyn ErasedStorage>);

impl AnyStorage {
    /// Erases the type of `storage`.
    pub fn new(storage: impl Storage) -> Self {
        AnyStorage(Arc::new(storage))
    }
}

impl fmt::Debug for AnyStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyStorage").finish_non_exhaustive()
    }
}

impl Storage for AnyStorage {
    async fn load(&self, topic: &Topic) -> Result<Option<Record>> {
        self.0.load(topic).await
    }

    async fn store(&self, topic: &Topic, record: &Record) -> Result<()> {
        self.0.store(topic, record).await
    }

    async fn remove(&self, topic: &Topic) -> Result<()> {
        self.0.remove(topic).await
    }

    async fn topics(&self) -> Result<Vec<Topic>> {
        self.0.topics().await
    }

    async fn store_if(
        &self,
        topic: &Topic,
        expected: Option<Revision>,
        record: &Record,
    ) -> Result<Stored> {
        self.0.store_if(topic, expected, record).await
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        self.0.changes()
    }
}

/// The object-safe form of [`Storage`] behind [`AnyStorage`].
trait ErasedStorage: Send + Sync + 'static {
    fn load<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<Option<Record>>>;
    fn store<'a>(&'a self, topic: &'a Topic, record: &'a Record) -> BoxFuture<'a, Result<()>>;
    fn remove<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<()>>;
    fn topics(&self) -> BoxFuture<'_, Result<Vec<Topic>>>;
    fn store_if<'a>(
        &'a self,
        topic: &'a Topic,
        expected: Option<Revision>,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Stored>>;
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>>;
}

impl<S: Storage> ErasedStorage for S {
    fn load<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<Option<Record>>> {
        Box::pin(Storage::load(self, topic))
    }

    fn store<'a>(&'a self, topic: &'a Topic, record: &'a Record) -> BoxFuture<'a, Result<()>> {
        Box::pin(Storage::store(self, topic, record))
    }

    fn remove<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<()>> {
        Box::pin(Storage::remove(self, topic))
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<Topic>>> {
        Box::pin(Storage::topics(self))
    }

    fn store_if<'a>(
        &'a self,
        topic: &'a Topic,
        expected: Option<Revision>,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Stored>> {
        Box::pin(Storage::store_if(self, topic, expected, record))
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        Storage::changes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_anything_else_is_ignored() {
        let topic = Topic::new("cart:user:1").unwrap();
        let notice = Change::notice(&topic, Revision::new(42));
        assert_eq!(notice, "42 cart:user:1");
        assert_eq!(
            Change::from_notice(&notice),
            Some(Change::Stored {
                topic,
                revision: Revision::new(42),
            })
        );
        for bad in ["x y", "42", "42  ", "01 t", ""] {
            assert_eq!(Change::from_notice(bad), None, "{bad:?}");
        }
    }
}
