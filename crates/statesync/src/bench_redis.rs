//! `statesync bench --baseline redis`: what a user would build instead of a
//! hub, measured the same way. A `redis-server` started here (no
//! persistence); the writer `SET`s one key and `PUBLISH`es its revision in
//! one transaction; each replica listens on pub/sub and `GET`s the key,
//! coalescing: while a `GET` is in flight, newer notices only raise the
//! revision it will fetch next, so a busy replica skips revisions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use state_sync_redis::testkit::RedisServer;

use crate::bench::{Applied, Convergence, Load};

const KEY: &str = "statesync-bench:doc";
const CHANNEL: &str = "statesync-bench:changes";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the baseline; its figures as JSON.
///
/// # Errors
///
/// Redis cannot be started or reached, or a replica did not converge
/// within 60 s.
pub(crate) async fn run(load: Load) -> Result<Value, BoxError> {
    // Starting and stopping the server blocks: off the runtime's threads.
    let server = tokio::task::spawn_blocking(RedisServer::try_start).await??;
    let client = redis::Client::open(server.url())?;
    let mut writer = client.get_multiplexed_async_connection().await?;
    let payload = "x".repeat(load.payload_bytes);
    let document = |seq: u32| {
        // `<revision>|<json>`: one GET gives both.
        format!("{seq}|{}", json!({"seq": seq, "payload": payload}))
    };
    redis::cmd("SET")
        .arg(KEY)
        .arg(document(0))
        .query_async::<()>(&mut writer)
        .await?;

    let mut logs: Vec<Applied<u32>> = Vec::with_capacity(load.clients as usize);
    let mut tasks = Vec::with_capacity(load.clients as usize);
    for _ in 0..load.clients {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        let connection = client.get_multiplexed_async_connection().await?;
        let log: Applied<u32> = Arc::new(Mutex::new(Vec::with_capacity(load.writes as usize)));
        logs.push(log.clone());
        tasks.push(tokio::spawn(replica(pubsub, connection, log, load.writes)));
    }

    let before = Usage::of(&server);
    let mut writes = Vec::with_capacity(load.writes as usize);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(load.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1..=load.writes {
        tick.tick().await;
        let sent = Instant::now();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(KEY)
            .arg(document(seq))
            .ignore()
            .cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(seq)
            .ignore()
            .query_async::<()>(&mut writer)
            .await?;
        writes.push((seq, sent));
    }
    let converged = tokio::time::timeout(Duration::from_secs(60), async {
        for task in tasks {
            task.await?;
        }
        Ok::<(), tokio::task::JoinError>(())
    })
    .await;
    if !matches!(converged, Ok(Ok(()))) {
        return Err("a Redis replica did not converge within 60 s".into());
    }
    let after = Usage::of(&server);
    let latency = Convergence::of(&writes, &logs);
    let per_write = |before: Option<f64>, after: Option<f64>| {
        before
            .zip(after)
            .map(|(b, a)| crate::bench::per_write((a - b).max(0.0), load.writes))
    };
    tokio::task::spawn_blocking(move || drop(server)).await?;
    Ok(json!({
        "baseline": "redis pub/sub + GET",
        "clients": load.clients,
        "writes": load.writes,
        "rate_per_sec": load.rate,
        "payload_bytes": load.payload_bytes,
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
        "max_ms": latency.max_ms,
        "redis_bytes_out_per_write": per_write(before.net_output_bytes, after.net_output_bytes),
        "redis_cpu_ms_per_write": per_write(before.cpu_ms, after.cpu_ms),
        "client_cpu_ms_per_write": per_write(before.client_cpu_ms, after.client_cpu_ms),
    }))
}

/// One coalescing replica: a notice raises the wanted revision; one `GET`
/// at a time fetches the newest; returns once it applied `last`.
async fn replica(
    pubsub: redis::aio::PubSub,
    mut connection: redis::aio::MultiplexedConnection,
    log: Applied<u32>,
    last: u32,
) {
    let mut notices = pubsub.into_on_message();
    let mut current = 0u32;
    while current < last {
        let Some(first) = notices.next().await else {
            return;
        };
        let mut wanted = notice_revision(&first);
        // Every notice that already arrived: only the newest counts.
        while let Some(Some(more)) = notices.next().now_or_never() {
            wanted = wanted.max(notice_revision(&more));
        }
        if wanted <= current {
            continue;
        }
        let Ok(stored) = redis::cmd("GET")
            .arg(KEY)
            .query_async::<String>(&mut connection)
            .await
        else {
            continue;
        };
        let Some((revision, data)) = stored.split_once('|') else {
            continue;
        };
        let revision: u32 = revision.parse().unwrap_or(0);
        // Decoded, as a replica would.
        if revision > current && serde_json::from_str::<Value>(data).is_ok() {
            current = revision;
            if let Ok(mut log) = log.lock() {
                log.push((revision, Instant::now()));
            }
        }
    }
}

fn notice_revision(message: &redis::Msg) -> u32 {
    message.get_payload::<u32>().unwrap_or(0)
}

/// What Redis and its replicas have used so far.
struct Usage {
    /// `total_net_output_bytes` from `INFO stats`.
    net_output_bytes: Option<f64>,
    /// `used_cpu_sys + used_cpu_user` from `INFO cpu`, in ms.
    cpu_ms: Option<f64>,
    /// This process's CPU time (the replicas and the writer), in ms.
    client_cpu_ms: Option<f64>,
}

impl Usage {
    fn of(server: &RedisServer) -> Usage {
        let info = server.cli(&["INFO"]);
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|n| n.trim().parse::<f64>().ok())
        };
        let cpu_seconds = field("used_cpu_sys").zip(field("used_cpu_user"));
        Usage {
            net_output_bytes: field("total_net_output_bytes"),
            cpu_ms: cpu_seconds.map(|(sys, user)| (sys + user) * 1e3),
            client_cpu_ms: crate::bench::cpu_time().map(|t| t.as_secs_f64() * 1e3),
        }
    }
}
