//! Replicas keep converging when the hub restarts: on the same storage, on
//! empty storage, and on storage that went back in time.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};

use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{
    BoxError, FetchError, FetchRequest, Fetched, InvalidationSink, Provider, Revision, Subscriber,
    Subscription, SyncHandle, Topic,
};
use state_sync_hub::{Hub, HubTopic};
use state_sync_storage::{FileStorage, MemoryStorage, Record, Storage};

/// Stands in for a transport: replicas talk to whichever hub is current,
/// and a switch is a reconnect (resubscribe, then `connection_restored`).
struct Link {
    current: Mutex<HubTopic<u64>>,
    sinks: Mutex<Vec<(InvalidationSink, Subscription)>>,
}

impl Link {
    fn new(topic: HubTopic<u64>) -> Arc<Self> {
        Arc::new(Link {
            current: Mutex::new(topic),
            sinks: Mutex::new(Vec::new()),
        })
    }

    fn current(&self) -> HubTopic<u64> {
        self.current.lock().unwrap().clone()
    }

    async fn reconnect_to(&self, topic: HubTopic<u64>) {
        *self.current.lock().unwrap() = topic.clone();
        let sinks: Vec<InvalidationSink> = self
            .sinks
            .lock()
            .unwrap()
            .drain(..)
            .map(|(sink, _old)| sink)
            .collect();
        for sink in sinks {
            let subscription = topic.subscribe(topic.topic(), sink.clone()).await.unwrap();
            self.sinks
                .lock()
                .unwrap()
                .push((sink.clone(), subscription));
            sink.connection_restored();
        }
    }
}

impl Subscriber for Link {
    async fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> Result<Subscription, BoxError> {
        let subscription = self.current().subscribe(topic, sink.clone()).await?;
        self.sinks.lock().unwrap().push((sink, subscription));
        Ok(Subscription::noop())
    }
}

impl Provider for Link {
    type Data = u64;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<u64>, FetchError>> + Send {
        let current = self.current();
        let request = request.clone();
        async move { current.fetch(&request).await }
    }
}

async fn replicas(link: &Arc<Link>, n: usize) -> Vec<(SyncHandle, Recorder<u64>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let recorder = Recorder::with_data();
        let topic = link.current().topic().clone();
        let handle =
            SyncHandle::from_parts(topic, link.clone(), link.clone(), recorder.clone()).build();
        handle.start().await.unwrap();
        out.push((handle, recorder));
    }
    out
}

async fn write_and_converge(
    topic: &HubTopic<u64>,
    writes: u64,
    replicas: &[(SyncHandle, Recorder<u64>)],
) -> Revision {
    let mut last = topic.revision();
    for _ in 0..writes {
        last = topic.update(|n| n + 1).await.unwrap();
    }
    for (handle, recorder) in replicas {
        handle.wait_for_revision(last).within_limit().await.unwrap();
        assert_eq!(recorder.last_data(), Some(*topic.get().value()));
    }
    last
}

#[tokio::test]
async fn restart_on_the_same_storage_continues_the_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::new(FileStorage::open(dir.path()).unwrap());
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    let link = Link::new(counter.clone());
    let replicas = replicas(&link, 3).await;
    let before = write_and_converge(&counter, 10, &replicas).await;

    hub.close().await;
    drop((hub, counter));
    let hub = Hub::new(FileStorage::open(dir.path()).unwrap());
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    assert_eq!(
        counter.revision(),
        before,
        "the stored revision is the floor"
    );
    assert_eq!(*counter.get().value(), 10);
    link.reconnect_to(counter.clone()).await;

    let after = write_and_converge(&counter, 10, &replicas).await;
    assert_eq!(after.get(), before.get() + 10);
    for (handle, recorder) in &replicas {
        assert_eq!(handle.local_revision(), after);
        assert_eq!(recorder.last_data(), Some(20));
        assert!(recorder.is_strictly_increasing());
    }
}

#[tokio::test]
async fn restart_on_empty_storage_starts_above_every_earlier_revision() {
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    let link = Link::new(counter.clone());
    let replicas = replicas(&link, 3).await;
    let before = write_and_converge(&counter, 10, &replicas).await;

    drop((hub, counter));
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    assert!(
        counter.revision() > before,
        "a fresh hub starts at {} ≤ {before}",
        counter.revision()
    );
    link.reconnect_to(counter.clone()).await;
    // The reconnect alone brings every replica to the new hub's state.
    for (handle, recorder) in &replicas {
        handle
            .wait_for_revision(counter.revision())
            .within_limit()
            .await
            .unwrap();
        assert_eq!(recorder.last_data(), Some(0));
    }
    write_and_converge(&counter, 5, &replicas).await;
    for (_, recorder) in &replicas {
        assert_eq!(recorder.last_data(), Some(5));
        assert!(recorder.is_strictly_increasing());
    }
}

#[tokio::test]
async fn replicas_ahead_of_a_restarted_hub_resync_instead_of_stalling() {
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    let link = Link::new(counter.clone());
    let replicas = replicas(&link, 3).await;
    write_and_converge(&counter, 3, &replicas).await;

    // A hub whose storage went back in time (restored backup, clock set
    // back): its revision is far below the replicas'.
    let storage = MemoryStorage::new();
    let topic = Topic::new("counter").unwrap();
    storage
        .store(&topic, &Record::new(Revision::new(5), &b"100"[..]))
        .await
        .unwrap();
    let hub = Hub::new(storage);
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    link.reconnect_to(counter.clone()).await;

    let next = counter.update(|n| n + 1).await.unwrap();
    assert_eq!(next, Revision::new(6));
    for (handle, recorder) in &replicas {
        handle.wait_for_revision(next).within_limit().await.unwrap();
        // wait_for_revision is ≥; the revision must be exactly the hub's.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while handle.local_revision() != next {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(recorder.last_data(), Some(101));
    }
}
