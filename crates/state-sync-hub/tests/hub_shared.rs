//! Several hubs on one shared storage behave as one: compare-and-set
//! across hubs, followed commits, lost notifications, a storage that lost
//! its data. On the in-memory shared storage; the engine crates run the
//! same checks on real Redis and PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{Revision, SyncHandle};
use state_sync_hub::{Error, Hub, HubTopic};
use state_sync_storage::conformance::SharedMemory;

fn hubs(storage: &SharedMemory, count: usize) -> Vec<Hub> {
    (0..count)
        .map(|_| {
            Hub::builder()
                .storage(storage.clone())
                .probe_interval(Duration::from_millis(50))
                .build()
        })
        .collect()
}

async fn counters(hubs: &[Hub]) -> Vec<HubTopic<u64>> {
    let mut topics = Vec::new();
    for hub in hubs {
        topics.push(hub.topic("counter", || 0u64).await.unwrap());
    }
    topics
}

async fn replica(topic: &HubTopic<u64>) -> (SyncHandle, Recorder<u64>) {
    let recorder = Recorder::with_data();
    let handle = SyncHandle::builder(
        topic.topic().clone(),
        topic.clone(),
        topic.clone(),
        recorder.clone(),
    )
    .build();
    handle.start().await.unwrap();
    (handle, recorder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_on_three_hubs_increment_exactly_and_never_reuse_a_revision() {
    let storage = SharedMemory::new();
    let hubs = hubs(&storage, 3);
    let topics = counters(&hubs).await;
    let mut replicas = Vec::new();
    for topic in &topics {
        replicas.push(replica(topic).await);
    }
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let topic = topics[i % 3].clone();
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for _ in 0..500 {
                    revisions.push(topic.update(|n| n + 1).await.unwrap());
                }
                revisions
            })
        })
        .collect();
    let mut issued = HashSet::new();
    for writer in writers {
        for revision in writer.within_limit().await.unwrap() {
            assert!(issued.insert(revision), "revision {revision} issued twice");
        }
    }
    assert_eq!(issued.len(), 4000);
    let last = *issued.iter().max().unwrap();
    for (topic, (handle, recorder)) in topics.iter().zip(&replicas) {
        handle.wait_for_revision(last).within_limit().await.unwrap();
        assert_eq!(recorder.last_data(), Some(4000));
        assert!(recorder.is_strictly_increasing());
        assert_eq!(topic.revision(), last, "every hub is at the last revision");
    }
}

#[tokio::test]
async fn compare_and_set_from_two_hubs_at_once_has_exactly_one_winner() {
    let storage = SharedMemory::new();
    let hubs = hubs(&storage, 2);
    let topics = counters(&hubs).await;
    let base = topics[0].revision();
    assert_eq!(
        topics[1].revision(),
        base,
        "both start from the stored record"
    );
    let (a, b) = tokio::join!(
        topics[0].compare_and_set(base, 1),
        topics[1].compare_and_set(base, 2)
    );
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        other => panic!("exactly one must win: {other:?}"),
    };
    assert!(
        matches!(lost, Error::Conflict { current, .. } if current == won),
        "{lost}"
    );
}

#[tokio::test]
async fn a_hub_catches_up_on_a_commit_whose_notification_was_lost() {
    let storage = SharedMemory::new();
    let hubs = hubs(&storage, 2);
    let topics = counters(&hubs).await;
    let (handle, recorder) = replica(&topics[1]).await;
    storage.mute(true);
    let revision = topics[0].replace(7).await.unwrap();
    // No notification: the probe finds it, without another write.
    handle
        .wait_for_revision(revision)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(7));
}

#[tokio::test]
async fn revisions_never_go_backwards_when_the_storage_lost_its_data() {
    let storage = SharedMemory::new();
    let hubs = hubs(&storage, 2);
    let topics = counters(&hubs).await;
    let (handle, recorder) = replica(&topics[1]).await;
    let before = topics[0].replace(1).await.unwrap();
    handle
        .wait_for_revision(before)
        .within_limit()
        .await
        .unwrap();
    storage.lose_everything().await;
    let after = topics[0].replace(2).await.unwrap();
    assert!(after > before, "{after} after {before}");
    handle
        .wait_for_revision(after)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(2));
    assert!(recorder.is_strictly_increasing());
    // The other hub writes on top of it too.
    let third = topics[1].update(|n| n + 1).await.unwrap();
    assert!(third > after);
    assert_eq!(*topics[1].get().value(), 3);
    let _ = Revision::ZERO;
}
