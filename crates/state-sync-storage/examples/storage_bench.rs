//! Commits per second for each storage backend; one JSON line each.
//!
//! ```text
//! cargo run --release -p state-sync-storage --example storage_bench
//! ```
//!
//! Each backend stores N records of ~200 bytes to one topic, one after the
//! other, awaiting each store. The memory backend is the baseline.

use std::time::Instant;

use state_sync::{Revision, Topic};
use state_sync_storage::{Durability, FileStorage, MemoryStorage, Record, Storage};

async fn commits_per_sec<S: Storage>(
    storage: &S,
    commits: u64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let topic = Topic::new("bench")?;
    let payload = format!("{{\"settings\":\"{}\"}}", "x".repeat(180));
    let t = Instant::now();
    for i in 1..=commits {
        storage
            .store(&topic, &Record::new(Revision::new(i), payload.clone()))
            .await?;
    }
    Ok(commits as f64 / t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let memory = commits_per_sec(&MemoryStorage::new(), 100_000).await?;
    println!(r#"{{"backend":"memory","commits_per_sec":{memory:.0}}}"#);
    for (name, durability, commits) in [
        ("file_fsync", Durability::Fsync, 2_000),
        ("file_no_fsync", Durability::NoFsync, 10_000),
    ] {
        let dir = std::env::temp_dir().join(format!("ssr-bench-{}-{name}", std::process::id()));
        let storage = FileStorage::open(&dir)?.durability(durability);
        let rate = commits_per_sec(&storage, commits).await?;
        std::fs::remove_dir_all(&dir)?;
        println!(
            r#"{{"backend":"{name}","commits":{commits},"commits_per_sec":{rate:.0},"ratio_to_memory":{:.5}}}"#,
            rate / memory
        );
    }
    Ok(())
}
