//! Many replicas over a seeded lossy bus converge (property test over seeds).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use state_sync::testkit::{Faults, SimulatedBus};
use state_sync::{MemorySource, Topic};

const REPLICAS: usize = 10;
const WRITERS: u64 = 4;
const WRITES: u64 = 1000;

/// Runs the scenario; returns the bus stats for reporting.
fn run(seed: u64) -> state_sync::testkit::BusStats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let source = MemorySource::new(Topic::new("doc").unwrap(), 0u64);
        let faults = Faults::none()
            .drop_rate(0.2)
            .duplicate_rate(0.2)
            .event_delay(Duration::from_millis(30))
            .fetch_failure_rate(0.1)
            .fetch_delay(Duration::from_millis(15));
        let bus = SimulatedBus::new(seed, faults);
        let mut replicas = Vec::new();
        for _ in 0..REPLICAS {
            replicas.push(
                bus.start_replica(source.topic(), source.clone())
                    .await
                    .unwrap(),
            );
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let source = source.clone();
                let mut rng = fastrand::Rng::with_seed(seed ^ w);
                tokio::spawn(async move {
                    for _ in 0..WRITES / WRITERS {
                        source.update(|v| v + 1);
                        tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        // Let in-flight faulty deliveries and retries play out, then one
        // clean write.
        tokio::time::sleep(Duration::from_secs(1)).await;
        bus.set_faults(Faults::none());
        let last = source.update(|v| v + 1);
        for (handle, recorder) in &replicas {
            tokio::time::timeout(Duration::from_secs(60), handle.wait_for_revision(last))
                .await
                .expect("replica converged")
                .unwrap();
            assert_eq!(handle.local_revision(), last);
            assert!(
                recorder.is_strictly_increasing(),
                "{:?}",
                recorder.revisions()
            );
        }
        assert_eq!(source.snapshot().data, WRITES + 1);
        bus.stats()
    })
}

#[test]
fn ten_replicas_converge_under_a_lossy_bus() {
    let stats = run(1);
    assert!(stats.dropped > 0 && stats.duplicated > 0 && stats.failed_fetches > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_for_any_seed(seed: u64) {
        run(seed);
    }
}
