//! Several replicas in one process stay in sync with one source through a
//! lossy simulated transport (drops, duplicates, reordering, failed fetches).
//!
//! ```text
//! cargo run -p state-sync --example lossy_replicas
//! ```
//!
//! Prints each apply as it happens, then a summary showing every replica at
//! the source's final revision.

use std::time::Duration;

use serde_json::{Value, json};
use state_sync::testkit::{Faults, SimulatedBus};
use state_sync::{
    BoxError, MemorySource, RetryPolicy, SnapshotEnvelope, SyncHandle, Topic, applier,
};

const REPLICAS: usize = 4;
const WRITES: u64 = 40;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let source = MemorySource::new(
        Topic::new("settings")?,
        json!({"counter": 0, "writer": null}),
    );
    let bus = SimulatedBus::new(42, Faults::lossy());
    println!(
        "source: topic `settings`; transport: 20% drops, 20% duplicates, 0-50 ms delays, 10% failed fetches\n"
    );

    let mut replicas = Vec::new();
    for id in 0..REPLICAS {
        let handle = SyncHandle::from_parts(
            source.topic().clone(),
            bus.subscriber(source.clone()),
            bus.provider(source.clone()),
            applier::from_fn(move |s: SnapshotEnvelope<Value>| {
                println!(
                    "replica {id} applied revision {:>3}: {}",
                    s.revision, s.data
                );
                Ok::<_, std::convert::Infallible>(())
            }),
        )
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_millis(20))
                .jitter(true),
        )
        .on_error(move |e| println!("replica {id} {e} (handled)"))
        .build();
        handle.start().await?;
        replicas.push(handle);
    }

    for i in 1..=WRITES {
        let writer = if i % 2 == 0 { "alice" } else { "bob" };
        source.update(|_| json!({"counter": i, "writer": writer}));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Whatever was lost above, one clean invalidation brings everyone up.
    bus.set_faults(Faults::none());
    let last = source.update(|v| json!({"counter": v["counter"], "writer": "final"}));

    for handle in &replicas {
        tokio::time::timeout(Duration::from_secs(10), handle.wait_for_revision(last)).await??;
    }
    let stats = bus.stats();
    println!(
        "\nsummary: {} writes; bus delivered {}, dropped {}, duplicated {}; {} fetches ({} failed on purpose)",
        WRITES + 1,
        stats.delivered,
        stats.dropped,
        stats.duplicated,
        stats.fetches,
        stats.failed_fetches
    );
    let revisions: Vec<String> = replicas
        .iter()
        .map(|h| h.local_revision().to_string())
        .collect();
    println!(
        "source revision {last}; replica revisions [{}]: {}",
        revisions.join(", "),
        if replicas.iter().all(|h| h.local_revision() == last) {
            "all converged"
        } else {
            "NOT converged"
        }
    );
    for handle in &replicas {
        handle.stop().await;
    }
    Ok(())
}
