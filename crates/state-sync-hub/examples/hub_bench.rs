//! Hub throughput and snapshot sharing; one JSON line per measurement.
//!
//! ```text
//! cargo run --release -p state-sync-hub --example hub_bench
//! ```
//!
//! - `commits`: writes per second through [`HubTopic::update`] for each
//!   backend, by one sequential writer and by 32 concurrent writers, with
//!   group commit on (the default) and off. The memory backend with one
//!   writer is the baseline.
//! - `snapshot_sharing`: handing one revision's snapshot to 1 000 readers
//!   (the hub's shared encoding) against serializing it 1 000 times.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use state_sync_hub::{Hub, HubTopic};
use state_sync_storage::{Durability, FileStorage};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Serialize, Deserialize)]
struct Doc {
    counter: u64,
    padding: String,
}

async fn commits_per_sec(
    topic: &HubTopic<Doc>,
    writers: u64,
    commits: u64,
) -> Result<f64, BoxError> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let topic = topic.clone();
            tokio::spawn(async move {
                for _ in 0..commits / writers {
                    topic
                        .update(|d| Doc {
                            counter: d.counter + 1,
                            padding: d.padding.clone(),
                        })
                        .await?;
                }
                Ok::<_, state_sync_hub::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(commits as f64 / t.elapsed().as_secs_f64())
}

async fn open(hub: &Hub) -> Result<HubTopic<Doc>, BoxError> {
    Ok(hub
        .topic("bench", || Doc {
            counter: 0,
            padding: "x".repeat(180),
        })
        .await?)
}

async fn commits() -> Result<(), BoxError> {
    let baseline = commits_per_sec(&open(&Hub::in_memory()).await?, 1, 200_000).await?;
    println!(
        r#"{{"workload":"commits","backend":"memory","writers":1,"commits_per_sec":{baseline:.0},"ratio":1}}"#
    );
    let memory32 = commits_per_sec(&open(&Hub::in_memory()).await?, 32, 200_000).await?;
    println!(
        r#"{{"workload":"commits","backend":"memory","writers":32,"commits_per_sec":{memory32:.0},"ratio":{:.3}}}"#,
        memory32 / baseline
    );
    for (name, durability) in [
        ("file_fsync", Durability::Fsync),
        ("file_no_fsync", Durability::NoFsync),
    ] {
        for (writers, group, commits) in [(1, true, 2_000), (32, false, 2_000), (32, true, 20_000)]
        {
            let dir = tempfile::tempdir()?;
            let storage = FileStorage::open(dir.path())?.durability(durability);
            let hub = Hub::builder().storage(storage).group_commit(group).build();
            let rate = commits_per_sec(&open(&hub).await?, writers, commits).await?;
            println!(
                r#"{{"workload":"commits","backend":"{name}","writers":{writers},"group_commit":{group},"commits":{commits},"commits_per_sec":{rate:.0},"ratio":{:.5}}}"#,
                rate / baseline
            );
        }
    }
    Ok(())
}

async fn snapshot_sharing() -> Result<(), BoxError> {
    const READERS: u32 = 1_000;
    let hub = Hub::in_memory();
    let doc = hub.json_topic("doc").await?;
    let items: Vec<_> = (0..100)
        .map(|i| serde_json::json!({"id": i, "name": format!("item {i}"), "tags": ["a", "b"], "price": f64::from(i) * 1.5}))
        .collect();
    doc.replace(serde_json::json!({ "items": items })).await?;
    let size = doc.get().json().len();

    // Best of 5 to keep scheduler noise out of both sides.
    let mut shared_ns = f64::MAX;
    let mut serialize_ns = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut total = 0;
        for _ in 0..READERS {
            total += std::hint::black_box(hub.get_json(doc.topic())?).data.len();
        }
        shared_ns = shared_ns.min(t.elapsed().as_nanos() as f64);
        assert_eq!(total, size * READERS as usize);

        let value = doc.get().shared_value();
        let t = Instant::now();
        for _ in 0..READERS {
            std::hint::black_box(serde_json::to_vec(&*value)?);
        }
        serialize_ns = serialize_ns.min(t.elapsed().as_nanos() as f64);
    }
    println!(
        r#"{{"workload":"snapshot_sharing","readers":{READERS},"snapshot_bytes":{size},"shared_us":{:.1},"serialize_each_us":{:.1},"ratio":{:.4}}}"#,
        shared_ns / 1e3,
        serialize_ns / 1e3,
        shared_ns / serialize_ns
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    snapshot_sharing().await?;
    commits().await?;
    Ok(())
}
