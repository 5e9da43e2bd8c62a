//! The hub's contract: typed writes, compare-and-set, invalidations with
//! source ids, one encoding per revision, storage failures that lose
//! nothing, group commit, close.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use state_sync::testkit::WithinLimit;
use state_sync::{InvalidationEvent, InvalidationSink, Revision, Subscriber, SyncHandle, Topic};
use state_sync_hub::{Error, Hub};
use state_sync_storage::conformance::FaultyStorage;
use state_sync_storage::{MemoryStorage, Record, Storage};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    volume: u8,
}

/// Subscribes to `topic` on `hub` and collects the invalidations.
async fn events(
    hub: &Hub,
    topic: &Topic,
) -> (Arc<Mutex<Vec<InvalidationEvent>>>, state_sync::Subscription) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let sink =
        InvalidationSink::from_fn(topic.clone(), move |e| log.lock().unwrap().push(e.clone()));
    let subscription = hub.subscribe(topic, sink).await.unwrap();
    (seen, subscription)
}

#[tokio::test]
async fn every_commit_bumps_the_revision_by_one_and_invalidates_once() {
    let hub = Hub::in_memory();
    let settings = hub.topic("settings", Settings::default).await.unwrap();
    let (seen, _subscription) = events(&hub, settings.topic()).await;
    let start = settings.revision();

    let window_a = settings.with_source_id("a");
    let r1 = window_a
        .replace(Settings {
            theme: "dark".into(),
            volume: 3,
        })
        .await
        .unwrap();
    let r2 = settings
        .update(|s| Settings {
            volume: s.volume + 1,
            ..s.clone()
        })
        .await
        .unwrap();
    let r3 = settings
        .compare_and_set(r2, Settings::default())
        .await
        .unwrap();

    assert_eq!([r1, r2, r3], [start.next(), start.next().next(), r2.next()]);
    let events = seen.lock().unwrap().clone();
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.revision, e.source_id.as_deref()))
        .collect();
    assert_eq!(got, [(r1, Some("a")), (r2, None), (r3, None)]);
    assert_eq!(settings.get().revision(), r3);
    assert_eq!(*settings.get().value(), Settings::default());
}

#[tokio::test]
async fn compare_and_set_conflict_carries_the_current_revision_and_commits_nothing() {
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 0u32).await.unwrap();
    let old = counter.revision();
    let now = counter.replace(1).await.unwrap();

    let error = counter.compare_and_set(old, 99).await.unwrap_err();
    assert!(
        matches!(&error, Error::Conflict { expected, current, .. } if *expected == old && *current == now),
        "{error:?}"
    );
    assert_eq!(error.code(), "conflict");
    assert_eq!(error.current_revision(), Some(now));
    assert_eq!(*counter.get().value(), 1);
    assert_eq!(counter.revision(), now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_under_contention_loses_no_increment() {
    const TASKS: usize = 8;
    const INCREMENTS: usize = 1000;
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 0u64).await.unwrap();
    let start = counter.revision();

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut revisions = Vec::with_capacity(INCREMENTS);
                let mut conflicts = 0u64;
                for _ in 0..INCREMENTS {
                    loop {
                        let current = counter.get();
                        match counter
                            .compare_and_set(current.revision(), current.value() + 1)
                            .await
                        {
                            Ok(revision) => {
                                revisions.push(revision);
                                break;
                            }
                            Err(Error::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                }
                (revisions, conflicts)
            })
        })
        .collect();

    let mut all = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (revisions, c) = task.await.unwrap();
        all.extend(revisions);
        conflicts += c;
    }
    let total = (TASKS * INCREMENTS) as u64;
    assert_eq!(*counter.get().value(), total);
    assert_eq!(counter.revision().get(), start.get() + total);
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a revision was handed out twice");
    assert_eq!(all.len() as u64, total);
    println!("{conflicts} conflicts retried");
}

#[tokio::test]
async fn each_revision_is_encoded_once_and_shared_by_every_reader() {
    let hub = Hub::in_memory();
    let doc = hub.json_topic("doc").await.unwrap();
    doc.replace(serde_json::json!({"title": "hello", "n": 1}))
        .await
        .unwrap();

    let a = hub.get_json(doc.topic()).unwrap();
    let b = hub.get_json(doc.topic()).unwrap();
    let c = doc.get();
    assert_eq!(a.data.as_ptr(), b.data.as_ptr(), "re-encoded for a reader");
    assert_eq!(a.data.as_ptr(), c.json().as_ptr());
    assert_eq!(&a.data[..], br#"{"n":1,"title":"hello"}"#);
}

#[tokio::test]
async fn json_writes_are_checked_against_the_topic_type() {
    let hub = Hub::in_memory();
    let settings = hub.topic("settings", Settings::default).await.unwrap();
    let topic = settings.topic().clone();
    let before = settings.revision();

    let bad = hub
        .set_json(&topic, br#"{"theme": 7}"#, None, None)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), "invalid_data");
    let garbage = hub
        .set_json(&topic, b"{not json", None, None)
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), "invalid_data");
    assert_eq!(
        settings.revision(),
        before,
        "a bad write committed something"
    );

    let ok = hub
        .set_json(
            &topic,
            br#"{"theme":"dark","volume":2}"#,
            Some(before),
            Some("cli".into()),
        )
        .await
        .unwrap();
    assert_eq!(ok, before.next());
    assert_eq!(settings.get().value().theme, "dark");

    let stale = hub
        .set_json(&topic, br#"{"theme":"x","volume":0}"#, Some(before), None)
        .await
        .unwrap_err();
    assert_eq!(stale.current_revision(), Some(ok));
}

#[tokio::test]
async fn unknown_topic_and_type_mismatch_are_clear_errors() {
    let hub = Hub::in_memory();
    let missing = Topic::new("missing").unwrap();
    assert_eq!(hub.get_json(&missing).unwrap_err().code(), "unknown_topic");
    let sink = InvalidationSink::from_fn(missing.clone(), |_| {});
    assert!(hub.subscribe(&missing, sink).await.is_err());
    assert_eq!(
        hub.set_json(&missing, b"1", None, None)
            .await
            .unwrap_err()
            .code(),
        "unknown_topic"
    );

    hub.topic("n", || 0u32).await.unwrap();
    let mismatch = hub.topic("n", String::new).await.unwrap_err();
    assert_eq!(mismatch.code(), "type_mismatch");
    assert_eq!(
        hub.topic(" ", || 0u32).await.unwrap_err().code(),
        "invalid_topic"
    );
    // Opening again with the same type is the same topic.
    let again = hub.topic("n", || 5u32).await.unwrap();
    assert_eq!(*again.get().value(), 0);
}

#[tokio::test]
async fn update_closure_errors_and_panics_commit_nothing() {
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 1u32).await.unwrap();
    let before = counter.revision();

    let refused = counter
        .try_update(|_| Err::<u32, _>("not allowed"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "update_failed");
    let panicked = counter.update(|_| panic!("boom")).await.unwrap_err();
    assert!(
        std::error::Error::source(&panicked)
            .unwrap()
            .to_string()
            .contains("boom")
    );
    assert_eq!(counter.revision(), before);
    // The writer task survived the panic.
    assert_eq!(counter.update(|n| n + 1).await.unwrap(), before.next());
}

#[tokio::test]
async fn a_stored_record_that_does_not_decode_is_an_error_not_a_default() {
    let storage = MemoryStorage::new();
    let topic = Topic::new("settings").unwrap();
    storage
        .store(&topic, &Record::new(Revision::new(7), &b"[1,2,3]"[..]))
        .await
        .unwrap();
    let hub = Hub::new(storage.clone());
    let error = hub.topic("settings", Settings::default).await.unwrap_err();
    assert_eq!(error.code(), "invalid_data");
    assert_eq!(
        storage.load(&topic).await.unwrap().unwrap().data,
        &b"[1,2,3]"[..],
        "the stored record was touched"
    );
    // The same record opens fine as raw JSON.
    let raw = hub.json_topic("settings").await.unwrap();
    assert_eq!(raw.revision(), Revision::new(7));
}

#[tokio::test]
async fn a_failed_store_commits_nothing_and_sends_no_invalidation() {
    let storage = FaultyStorage::new();
    let hub = Hub::new(storage.clone());
    let counter = hub.topic("counter", || 0u32).await.unwrap();
    let (seen, _subscription) = events(&hub, counter.topic()).await;
    let r1 = counter.replace(1).await.unwrap();

    storage.fail_stores(true);
    let error = counter.replace(2).await.unwrap_err();
    assert_eq!(error.code(), "storage");
    assert_eq!(*counter.get().value(), 1);
    assert_eq!(counter.revision(), r1);
    assert_eq!(seen.lock().unwrap().len(), 1);

    storage.fail_stores(false);
    assert_eq!(counter.replace(3).await.unwrap(), r1.next());
    let stored = storage
        .records()
        .load(counter.topic())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.revision, &stored.data[..]), (r1.next(), &b"3"[..]));
}

#[tokio::test(start_paused = true)]
async fn writes_queued_during_a_store_share_the_next_one() {
    let storage = FaultyStorage::new().with_delay(Duration::from_millis(10));
    let hub = Hub::new(storage.clone());
    let counter = hub.topic("counter", || 0u32).await.unwrap();
    let start = counter.revision();
    let (seen, _subscription) = events(&hub, counter.topic()).await;

    let writers: Vec<_> = (0..100)
        .map(|i| {
            let counter = counter.with_source_id(format!("w{i}"));
            tokio::spawn(async move { counter.update(|n| n + 1).await.unwrap() })
        })
        .collect();
    let mut revisions = Vec::new();
    for w in writers {
        revisions.push(w.await.unwrap());
    }
    revisions.sort();
    let expected: Vec<_> = (1..=100).map(|i| Revision::new(start.get() + i)).collect();
    assert_eq!(revisions, expected, "every writer gets its own revision");
    assert_eq!(*counter.get().value(), 100);
    let stores = storage.stores();
    assert!(stores < 10, "{stores} stores for 100 queued writes");
    // One invalidation per commit, in order, each naming its writer.
    let events = seen.lock().unwrap().clone();
    let event_revisions: Vec<_> = events.iter().map(|e| e.revision).collect();
    assert_eq!(event_revisions, expected);
    let writers: HashSet<_> = events
        .iter()
        .map(|e| e.source_id.clone().unwrap())
        .collect();
    assert_eq!(writers.len(), 100);
}

#[tokio::test(start_paused = true)]
async fn without_group_commit_every_write_is_stored() {
    let storage = FaultyStorage::new().with_delay(Duration::from_millis(10));
    let hub = Hub::builder()
        .storage(storage.clone())
        .group_commit(false)
        .build();
    let counter = hub.topic("counter", || 0u32).await.unwrap();
    let writers: Vec<_> = (0..20)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move { counter.update(|n| n + 1).await.unwrap() })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(storage.stores(), 20);
}

#[tokio::test(start_paused = true)]
async fn close_finishes_queued_writes_then_refuses_new_ones() {
    let storage = FaultyStorage::new().with_delay(Duration::from_millis(10));
    let hub = Hub::new(storage.clone());
    let counter = hub.topic("counter", || 0u32).await.unwrap();
    let queued: Vec<_> = (0..5)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move { counter.update(|n| n + 1).await })
        })
        .collect();
    tokio::task::yield_now().await;
    hub.close().await;
    for q in queued {
        q.await.unwrap().unwrap();
    }
    assert_eq!(*counter.get().value(), 5);
    let stored = storage
        .records()
        .load(counter.topic())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.data, &b"5"[..]);
    assert_eq!(counter.replace(0).await.unwrap_err().code(), "closed");
}

#[tokio::test]
async fn in_process_replicas_follow_with_conditional_fetch() {
    let hub = Hub::in_memory();
    let settings = hub.topic("settings", Settings::default).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Settings::default());
    let replica = SyncHandle::builder(settings.clone(), tx).build();
    replica.start().await.unwrap();
    assert_eq!(replica.local_revision(), settings.revision());

    let revision = settings
        .replace(Settings {
            theme: "dark".into(),
            volume: 9,
        })
        .await
        .unwrap();
    replica
        .wait_for_revision(revision)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(rx.borrow().volume, 9);

    // A replica that is current gets "not modified".
    let request = state_sync::FetchRequest::new(settings.topic().clone()).if_newer_than(revision);
    let fetched = state_sync::Provider::fetch(&settings, &request)
        .await
        .unwrap();
    assert!(matches!(fetched, state_sync::Fetched::NotModified { revision: r } if r == revision));
}

#[tokio::test]
async fn a_stuck_topic_does_not_block_other_topics() {
    let (storage, release) = FaultyStorage::new().holding(Topic::new("slow").unwrap());
    let hub = Hub::new(storage.clone());
    let slow = hub.topic("slow", || 0u32).await.unwrap();
    let fast = hub.topic("fast", || 0u32).await.unwrap();

    let stuck = tokio::spawn({
        let slow = slow.clone();
        async move { slow.replace(1).await }
    });
    for i in 1..=100 {
        fast.replace(i).await.unwrap();
    }
    assert_eq!(*fast.get().value(), 100);
    assert!(!stuck.is_finished());
    assert_eq!(*slow.get().value(), 0, "visible before it was stored");

    release.add_permits(1);
    stuck.await.unwrap().unwrap();
    assert_eq!(*slow.get().value(), 1);
}

#[test]
fn replicas_of_a_hub_converge_over_a_lossy_bus() {
    use state_sync::testkit::{Faults, SimulatedBus};

    for seed in 0..8 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let hub = Hub::in_memory();
            let doc = hub.topic("doc", || 0u64).await.unwrap();
            let bus = SimulatedBus::new(seed, Faults::lossy());
            let mut replicas = Vec::new();
            for _ in 0..5 {
                replicas.push(bus.start_replica(doc.topic(), doc.clone()).await.unwrap());
            }
            let writers: Vec<_> = (0..3)
                .map(|w| {
                    let doc = doc.with_source_id(format!("writer-{w}"));
                    tokio::spawn(async move {
                        for _ in 0..100 {
                            doc.update(|n| n + 1).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            bus.set_faults(Faults::none());
            let last = doc.update(|n| n + 1).await.unwrap();
            assert_eq!(*doc.get().value(), 301);
            for (handle, recorder) in &replicas {
                handle.wait_for_revision(last).within_limit().await.unwrap();
                assert_eq!(handle.local_revision(), last, "seed {seed}");
                assert!(recorder.is_strictly_increasing(), "seed {seed}");
            }
        });
    }
}
