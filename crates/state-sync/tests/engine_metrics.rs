//! With the `metrics` feature, a replica reports its applies and fetches
//! through the `metrics` facade, labelled by topic.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use state_sync::testkit::WithinLimit;
use state_sync::{MemorySource, SnapshotEnvelope, SyncHandle, Topic, applier};

#[test]
fn a_replica_counts_its_applies_and_fetches_per_topic() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let topic = Topic::new("settings").unwrap();
            let source = MemorySource::new(topic.clone(), 0u32);
            let handle = SyncHandle::builder(
                source.clone(),
                applier::from_fn(|_: SnapshotEnvelope<u32>| Ok::<(), std::convert::Infallible>(())),
            )
            .build();
            handle.start().within_limit().await.unwrap();
            let mut last = source.revision();
            for n in 1..=3 {
                last = source.publish(n);
            }
            handle.wait_for_revision(last).within_limit().await.unwrap();
            handle.stop().await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "topic" && l.value() == "settings")
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is {other:?}"),
            })
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let applies = counter("statesync_replica_applies_total");
    let fetches = counter("statesync_replica_fetches_total");
    // The initial snapshot and at least the last of three publishes.
    assert!((2..=4).contains(&applies), "{applies} applies");
    assert!(
        fetches >= applies,
        "{fetches} fetches for {applies} applies"
    );
}
