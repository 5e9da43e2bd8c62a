//! The conformance suite every [`Storage`] backend must pass.
//!
//! # Usage
//!
//! ```
//! use state_sync_storage::{conformance, MemoryStorage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // For durable backends, `open` must return a new handle on the *same*
//! // underlying store each time, so the suite can check persistence.
//! let shared = MemoryStorage::new();
//! conformance::run(|| shared.clone()).await;
//! # }
//! ```

use state_sync::{Revision, Topic};

use crate::storage::{Record, Storage};

/// Runs every check against fresh handles from `open`, panicking with a
/// description on the first failure. The store must start empty.
///
/// # Panics
///
/// When the backend breaks the [`Storage`] contract.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn run<S: Storage>(open: impl Fn() -> S) {
    let store = open();
    let a = Topic::new("conformance:a").expect("valid topic");
    let b = Topic::new("conformance:b").expect("valid topic");

    assert_eq!(
        store.load(&a).await.expect("load"),
        None,
        "empty store has no record"
    );
    assert!(
        store.topics().await.expect("topics").is_empty(),
        "empty store lists no topics"
    );

    let first = Record::new(Revision::new(1), &br#"{"v":1}"#[..]);
    store.store(&a, &first).await.expect("store");
    assert_eq!(
        store.load(&a).await.expect("load"),
        Some(first),
        "load returns what was stored"
    );

    let second = Record::new(Revision::new(2), &br#"{"v":"\u00e9\u2603 two"}"#[..]);
    store.store(&a, &second).await.expect("store");
    assert_eq!(
        store.load(&a).await.expect("load").as_ref(),
        Some(&second),
        "latest store wins"
    );

    assert_eq!(
        store.load(&b).await.expect("load"),
        None,
        "topics are independent"
    );
    let big = Record::new(Revision::MAX, vec![b'x'; 1 << 20]);
    store.store(&b, &big).await.expect("store");
    assert_eq!(
        store.load(&b).await.expect("load"),
        Some(big.clone()),
        "large record and max revision"
    );
    assert_eq!(
        store.load(&a).await.expect("load").as_ref(),
        Some(&second),
        "other topic untouched"
    );

    let mut topics = store.topics().await.expect("topics");
    topics.sort();
    assert_eq!(
        topics,
        [a.clone(), b.clone()],
        "topics lists every stored topic"
    );

    drop(store);
    let reopened = open();
    assert_eq!(
        reopened.load(&a).await.expect("load"),
        Some(second),
        "records survive reopening"
    );
    assert_eq!(
        reopened.load(&b).await.expect("load"),
        Some(big),
        "records survive reopening"
    );

    reopened.remove(&b).await.expect("remove");
    assert_eq!(
        reopened.load(&b).await.expect("load"),
        None,
        "removed record is gone"
    );
    assert_eq!(
        reopened.topics().await.expect("topics"),
        std::slice::from_ref(&a),
        "removed topic is not listed"
    );
    reopened
        .remove(&b)
        .await
        .expect("removing again is not an error");
    drop(reopened);
    assert_eq!(
        open().load(&b).await.expect("load"),
        None,
        "removal survives reopening"
    );
    assert!(
        open().load(&a).await.expect("load").is_some(),
        "remove touches one topic"
    );
}

/// A [`MemoryStorage`](crate::MemoryStorage) that can be made to fail, slow
/// down or hold stores, for testing what is built on storage (a hub, a
/// cache). Clones share the records and the knobs.
///
/// ```
/// use state_sync::{Revision, Topic};
/// use state_sync_storage::{conformance::FaultyStorage, Record, Storage};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let storage = FaultyStorage::new();
/// let topic = Topic::new("t").unwrap();
/// storage.fail_stores(true);
/// assert!(storage.store(&topic, &Record::new(Revision::new(1), "1")).await.is_err());
/// storage.fail_stores(false);
/// storage.store(&topic, &Record::new(Revision::new(1), "1")).await.unwrap();
/// assert_eq!(storage.stores(), 1);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct FaultyStorage {
    inner: crate::MemoryStorage,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stores: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    delay: Option<std::time::Duration>,
    held: Option<(Topic, std::sync::Arc<tokio::sync::Semaphore>)>,
}

impl FaultyStorage {
    /// Working storage, no delay.
    #[must_use]
    pub fn new() -> Self {
        FaultyStorage::default()
    }

    /// Every store first sleeps `delay` (Tokio time: pausable).
    #[must_use]
    pub fn with_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Stores of `topic` wait for a permit of the returned semaphore.
    #[must_use]
    pub fn holding(mut self, topic: Topic) -> (Self, std::sync::Arc<tokio::sync::Semaphore>) {
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        self.held = Some((topic, gate.clone()));
        (self, gate)
    }

    /// Makes every store fail with an I/O error (`true`) or work again.
    pub fn fail_stores(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stores that succeeded.
    #[must_use]
    pub fn stores(&self) -> usize {
        self.stores.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stores that began (including held, slow and failed ones).
    #[must_use]
    pub fn stores_started(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The records, bypassing every fault.
    #[must_use]
    pub fn records(&self) -> &crate::MemoryStorage {
        &self.inner
    }
}

impl Storage for FaultyStorage {
    async fn load(&self, topic: &Topic) -> crate::Result<Option<Record>> {
        self.inner.load(topic).await
    }

    async fn store(&self, topic: &Topic, record: &Record) -> crate::Result<()> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some((held, gate)) = &self.held
            && held == topic
            && let Ok(permit) = gate.acquire().await
        {
            permit.forget();
        }
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::Error::Io {
                path: "<faulty storage>".into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        self.stores
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.store(topic, record).await
    }

    async fn remove(&self, topic: &Topic) -> crate::Result<()> {
        self.inner.remove(topic).await
    }

    async fn topics(&self) -> crate::Result<Vec<Topic>> {
        self.inner.topics().await
    }
}

/// Runs the checks every *shared* storage must pass on top of [`run`]:
/// `store_if` is a compare-and-set, and a commit made through one handle is
/// announced on another handle's [`changes`](Storage::changes). `open` must
/// return handles on the same store (as separate hubs would hold them); the
/// store must start empty.
///
/// # Panics
///
/// When the backend breaks the contract.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn run_shared<S: Storage>(open: impl Fn() -> S) {
    use crate::storage::{Change, Stored};
    let writer = open();
    let watcher = open();
    let mut changes = watcher.changes().expect("a shared storage reports changes");
    let topic = Topic::new("conformance:shared").expect("valid topic");
    let first = Record::new(Revision::new(10), &b"1"[..]);
    let second = Record::new(Revision::new(11), &b"2"[..]);

    assert_eq!(
        writer
            .store_if(&topic, None, &first)
            .await
            .expect("store_if"),
        Stored::Committed,
        "expecting nothing on an empty topic commits"
    );
    assert_eq!(
        writer
            .store_if(&topic, None, &second)
            .await
            .expect("store_if"),
        Stored::Conflict(Some(first.clone())),
        "expecting nothing on a stored topic conflicts, with the current record"
    );
    assert_eq!(
        writer
            .store_if(&topic, Some(Revision::new(9)), &second)
            .await
            .expect("store_if"),
        Stored::Conflict(Some(first.clone())),
        "a stale expectation conflicts"
    );
    assert_eq!(
        watcher
            .store_if(&topic, Some(first.revision), &second)
            .await
            .expect("store_if"),
        Stored::Committed,
        "the current expectation commits, from any handle"
    );
    assert_eq!(
        writer.load(&topic).await.expect("load"),
        Some(second.clone()),
        "every handle sees the commit"
    );
    let other = Topic::new("conformance:elsewhere").expect("valid topic");
    assert_eq!(
        writer
            .store_if(&other, Some(Revision::new(1)), &first)
            .await
            .expect("store_if"),
        Stored::Conflict(None),
        "expecting a record that is not there conflicts with none"
    );

    // The commits are announced, or a resync tells the watcher to re-read.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.contains(&second.revision) {
        let change = tokio::time::timeout_at(deadline, changes.recv())
            .await
            .expect("the commits are announced within 10 s")
            .expect("the change feed is open");
        match change {
            Change::Stored { topic: t, revision } if t == topic => seen.push(revision),
            // Notices may have been lost (the listener was still
            // connecting when the commits were made): re-read, as a hub
            // does.
            Change::Resync => {
                if let Some(record) = watcher.load(&topic).await.expect("load") {
                    seen.push(record.revision);
                }
            }
            _ => {}
        }
    }
    writer.remove(&topic).await.expect("remove");
}

/// A shared storage in memory: [`MemoryStorage`](crate::MemoryStorage)'s
/// records with a compare-and-set `store_if` and a change feed, shared by
/// every clone. Stands in for a database shared by several hubs in tests.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    records: crate::MemoryStorage,
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    changes: tokio::sync::broadcast::Sender<crate::storage::Change>,
    muted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for SharedMemory {
    fn default() -> Self {
        SharedMemory {
            records: crate::MemoryStorage::new(),
            lock: std::sync::Arc::default(),
            changes: tokio::sync::broadcast::channel(1024).0,
            muted: std::sync::Arc::default(),
        }
    }
}

impl SharedMemory {
    /// Empty.
    #[must_use]
    pub fn new() -> Self {
        SharedMemory::default()
    }

    /// Stops (`true`) or resumes announcing commits, as a notification
    /// connection that is down would.
    pub fn mute(&self, muted: bool) {
        self.muted.store(muted, std::sync::atomic::Ordering::SeqCst);
    }

    fn announce(&self, topic: &Topic, revision: Revision) {
        if !self.muted.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.changes.send(crate::storage::Change::Stored {
                topic: topic.clone(),
                revision,
            });
        }
    }

    /// Forgets every record, as an engine restarted without persistence
    /// would, and tells the followers to resync.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lose_everything(&self) {
        let _turn = self.lock.lock().await;
        for topic in self.records.topics().await.unwrap_or_default() {
            let _ = self.records.remove(&topic).await;
        }
        let _ = self.changes.send(crate::storage::Change::Resync);
    }
}

impl Storage for SharedMemory {
    async fn load(&self, topic: &Topic) -> crate::Result<Option<Record>> {
        self.records.load(topic).await
    }

    async fn store(&self, topic: &Topic, record: &Record) -> crate::Result<()> {
        let _turn = self.lock.lock().await;
        self.records.store(topic, record).await?;
        self.announce(topic, record.revision);
        Ok(())
    }

    async fn remove(&self, topic: &Topic) -> crate::Result<()> {
        self.records.remove(topic).await
    }

    async fn topics(&self) -> crate::Result<Vec<Topic>> {
        self.records.topics().await
    }

    async fn store_if(
        &self,
        topic: &Topic,
        expected: Option<Revision>,
        record: &Record,
    ) -> crate::Result<crate::storage::Stored> {
        let _turn = self.lock.lock().await;
        let current = self.records.load(topic).await?;
        if current.as_ref().map(|r| r.revision) != expected {
            return Ok(crate::storage::Stored::Conflict(current));
        }
        self.records.store(topic, record).await?;
        self.announce(topic, record.revision);
        Ok(crate::storage::Stored::Committed)
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<crate::storage::Change>> {
        Some(self.changes.subscribe())
    }
}
