//! Scenarios every shared storage must pass with several hubs on it
//! (feature `testkit`): the engine crates run them on real servers, the
//! hub's own tests on `conformance::SharedMemory`.
//!
//! Each takes storages that share one store, one per hub, as separate
//! processes would hold them, and panics with a description on failure.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{Revision, SyncHandle};
use state_sync_storage::Storage;

use crate::{Error, Hub, HubTopic};

/// A hub on `storage` that probes every 100 ms.
fn hub_on(storage: impl Storage) -> Hub {
    Hub::builder()
        .storage(storage)
        .probe_interval(Duration::from_millis(100))
        .build()
}

async fn counter(hub: &Hub, name: &str) -> HubTopic<u64> {
    hub.topic(name, || 0u64).await.expect("open the counter")
}

async fn replica(topic: &HubTopic<u64>) -> (SyncHandle, Recorder<u64>) {
    let recorder = Recorder::with_data();
    let handle = SyncHandle::from_parts(
        topic.topic().clone(),
        topic.clone(),
        topic.clone(),
        recorder.clone(),
    )
    .build();
    handle.start().await.expect("start a replica");
    (handle, recorder)
}

/// `writers` writers spread over the hubs each make `each` atomic
/// increments of one counter: the total is exact, no revision is issued
/// twice, and a replica on every hub converges to the last revision with
/// revisions only going up.
///
/// # Panics
///
/// When any of that fails.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn increments_across_hubs<S: Storage>(storages: Vec<S>, writers: usize, each: u64) {
    let hubs: Vec<Hub> = storages.into_iter().map(hub_on).collect();
    let mut topics = Vec::new();
    for hub in &hubs {
        topics.push(counter(hub, "testkit:counter").await);
    }
    let mut replicas = Vec::new();
    for topic in &topics {
        replicas.push(replica(topic).await);
    }
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let topic = topics[i % topics.len()].clone();
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for _ in 0..each {
                    revisions.push(topic.update(|n| n + 1).await.expect("increment"));
                }
                revisions
            })
        })
        .collect();
    let mut issued = HashSet::new();
    for task in tasks {
        for revision in task.within_limit().await.expect("writer task") {
            assert!(issued.insert(revision), "revision {revision} issued twice");
        }
    }
    let total = each * writers as u64;
    assert_eq!(issued.len() as u64, total);
    let last = issued.iter().max().copied().unwrap_or(Revision::ZERO);
    for (handle, recorder) in &replicas {
        handle
            .wait_for_revision(last)
            .within_limit()
            .await
            .expect("replica converges");
        assert_eq!(recorder.last_data(), Some(total), "exact total");
        assert!(recorder.is_strictly_increasing(), "revisions only go up");
    }
}

/// Two hubs compare-and-set the same base revision at once: exactly one
/// wins, the other gets `conflict` with the winner's revision.
///
/// # Panics
///
/// When both or neither win.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn one_compare_and_set_winner<S: Storage>(a: S, b: S) {
    let (a, b) = (hub_on(a), hub_on(b));
    let (ta, tb) = (
        counter(&a, "testkit:cas").await,
        counter(&b, "testkit:cas").await,
    );
    let base = ta.revision();
    assert_eq!(tb.revision(), base, "both hubs start from one record");
    let (ra, rb) = tokio::join!(ta.compare_and_set(base, 1), tb.compare_and_set(base, 2));
    let (won, lost) = match (ra, rb) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        other => panic!("exactly one must win: {other:?}"),
    };
    assert!(
        matches!(lost, Error::Conflict { current, .. } if current == won),
        "{lost}"
    );
}

/// `cut` breaks the second hub's change notifications (a killed
/// notification connection, a muted feed); a write on the first hub still
/// reaches a replica on the second, with no further write.
///
/// # Panics
///
/// When the replica never catches up.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn catches_up_after_lost_notifications<S, F, Fut>(a: S, b: S, cut: F)
where
    S: Storage,
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let (a, b) = (hub_on(a), hub_on(b));
    let (ta, tb) = (
        counter(&a, "testkit:notify").await,
        counter(&b, "testkit:notify").await,
    );
    let (handle, recorder) = replica(&tb).await;
    cut().await;
    let revision = ta.replace(7).await.expect("write");
    handle
        .wait_for_revision(revision)
        .within_limit()
        .await
        .expect("the replica catches up");
    assert_eq!(recorder.last_data(), Some(7));
}

/// `lose` makes the storage forget everything (an engine restarted without
/// persistence); writes go on, and no replica ever sees a revision go
/// backwards.
///
/// # Panics
///
/// When a revision goes backwards or a write fails for good.
///
/// # Cancel safety
///
/// Not meant to be cancelled: a test helper.
pub async fn never_backwards_after_data_loss<S, F, Fut>(a: S, b: S, lose: F)
where
    S: Storage,
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let (a, b) = (hub_on(a), hub_on(b));
    let (ta, tb) = (
        counter(&a, "testkit:loss").await,
        counter(&b, "testkit:loss").await,
    );
    let (handle, recorder) = replica(&tb).await;
    let before = ta.replace(1).await.expect("write");
    handle
        .wait_for_revision(before)
        .within_limit()
        .await
        .expect("replica");
    lose().await;
    // The storage may take a moment to come back: retry the write.
    let after = async {
        loop {
            match ta.replace(2).await {
                Ok(revision) => break revision,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    .within_limit()
    .await;
    assert!(after > before, "{after} after {before}");
    handle
        .wait_for_revision(after)
        .within_limit()
        .await
        .expect("replica");
    assert_eq!(recorder.last_data(), Some(2));
    let third = tb.update(|n| n + 1).await.expect("write on the other hub");
    assert!(third > after);
    assert_eq!(*tb.get().value(), 3);
    assert!(recorder.is_strictly_increasing());
}
