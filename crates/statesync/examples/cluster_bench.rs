//! Load generator for several hubs on one engine (Redis or PostgreSQL): 3
//! hubs × N replicas over Unix sockets, writes on every hub; cross-hub
//! convergence latency, engine commands and reads per write, and commits/s
//! under compare-and-set contention, next to one hub with as many replicas
//! measured in the same run. One JSON line per figure.
//!
//! ```text
//! cargo run --release -p statesync --example cluster_bench            # Redis, 300 replicas per hub
//! cargo run --release -p statesync --example cluster_bench -- 100
//! cargo run --release -p statesync --example cluster_bench -- 300 --postgres
//! ```
//!
//! It starts its own `redis-server` (no persistence, free loopback port) or
//! PostgreSQL (with `pg_stat_statements`, to count statements).
//! Each hub runs in a child process (this example, re-executed). Latency is
//! measured per write from just before the writer sends `set` on hub A
//! until every replica on the *other* hubs has applied that revision.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use state_sync::{RetryPolicy, Revision, SnapshotEnvelope, SyncHandle, applier};
use state_sync_hub::Hub;
use state_sync_net::{
    AccessConfig, Client, ClientOptions, Endpoint, Error as ClientError, Server, ServerConfig,
};
use state_sync_postgres::PostgresStorage;
use state_sync_postgres::testkit::PostgresServer;
use state_sync_redis::RedisStorage;
use state_sync_redis::testkit::RedisServer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HUB_ENV: &str = "STATESYNC_CLUSTER_BENCH_HUB";
const SOCKET_ENV: &str = "STATESYNC_CLUSTER_BENCH_SOCKET";
const WRITES: usize = 200;
const RATE_PER_SEC: u64 = 50;
const CONTENTION_SECS: u64 = 3;

/// The child: one hub on Redis, PostgreSQL, or in memory when the engine
/// is `memory`, served on a Unix socket; prints the socket's path.
async fn hub_child(engine: String, socket: String) -> Result<(), BoxError> {
    let hub = if engine == "memory" {
        Hub::in_memory()
    } else if engine.starts_with("redis://") {
        Hub::new(RedisStorage::connect(&engine).await?)
    } else {
        Hub::new(PostgresStorage::connect(&engine).await?)
    };
    hub.json_topic("bench").await?;
    hub.json_topic("contended").await?;
    let server = Server::with_config(hub, ServerConfig::default(), AccessConfig::open());
    let path = server.listen_unix(socket).await?;
    println!("{}", path.display());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

struct HubProcess {
    child: Child,
    socket: std::path::PathBuf,
}

impl HubProcess {
    fn start(engine: &str, socket: &std::path::Path) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(HUB_ENV, engine)
            .env(SOCKET_ENV, socket)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
        Ok(HubProcess {
            child,
            socket: line.trim().into(),
        })
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per replica: (revision, when applied).
type Applied = Arc<Mutex<Vec<(Revision, Instant)>>>;

async fn replicas_on(
    socket: &std::path::Path,
    count: usize,
) -> Result<Vec<(Client, SyncHandle, Applied)>, BoxError> {
    let mut all = Vec::with_capacity(count);
    for i in 0..count {
        let client = Client::connect(
            Endpoint::Unix(socket.to_owned()),
            ClientOptions::new(format!("r{i}")),
        );
        client.wait_connected().await;
        let remote = client.topic::<Value>("bench")?;
        let log: Applied = Arc::new(Mutex::new(Vec::with_capacity(WRITES + 1)));
        let record = log.clone();
        let handle = SyncHandle::builder(
            remote.clone(),
            applier::from_fn(move |s: SnapshotEnvelope<Value>| {
                if let Ok(mut log) = record.lock() {
                    log.push((s.revision, Instant::now()));
                }
                Ok::<(), std::convert::Infallible>(())
            }),
        )
        .retry(RetryPolicy::default().max_attempts(10))
        .build();
        handle.start().await?;
        all.push((client, handle, log));
    }
    Ok(all)
}

/// The shared engine under the three hubs.
enum Engine {
    Redis(RedisServer),
    Postgres(PostgresServer),
}

impl Engine {
    fn start(postgres: bool) -> Engine {
        if postgres {
            let server =
                PostgresServer::start_with(&["shared_preload_libraries=pg_stat_statements"]);
            let _ = server.psql("CREATE EXTENSION pg_stat_statements");
            Engine::Postgres(server)
        } else {
            Engine::Redis(RedisServer::start())
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Engine::Redis(_) => "Redis",
            Engine::Postgres(_) => "PostgreSQL",
        }
    }

    fn url(&self) -> String {
        match self {
            Engine::Redis(server) => server.url(),
            Engine::Postgres(server) => server.config(),
        }
    }

    /// (commands from the hubs, reads of a topic's record), so far.
    fn commands(&self) -> (u64, u64) {
        match self {
            Engine::Redis(server) => redis_commands(server),
            Engine::Postgres(server) => postgres_statements(server),
        }
    }
}

/// Redis commands counted by `INFO commandstats`: (all calls from
/// clients, follower reads). `commandstats` also counts what the commit
/// script runs inside (its own `HMGET`, `HSET`, `SADD`, `PUBLISH`): those
/// are subtracted, one each per `EVALSHA`.
fn redis_commands(redis: &RedisServer) -> (u64, u64) {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let mut all = 0;
    let mut reads = 0;
    let mut scripts = 0;
    for line in stats.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let calls: u64 = rest
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if name == "info" {
            continue;
        }
        all += calls;
        match name {
            "hmget" => reads += calls,
            "evalsha" | "eval" => scripts += calls,
            _ => {}
        }
    }
    (
        all.saturating_sub(4 * scripts),
        reads.saturating_sub(scripts),
    )
}

/// PostgreSQL statements counted by `pg_stat_statements` (`BEGIN` and
/// `COMMIT` included), except this function's own: (all, reads of a
/// topic's record).
fn postgres_statements(postgres: &PostgresServer) -> (u64, u64) {
    let out = postgres.psql(
        "SELECT coalesce(sum(calls), 0), \
                coalesce(sum(calls) FILTER (WHERE query LIKE 'SELECT revision, data FROM%'), 0) \
         FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'",
    );
    let mut numbers = out.trim().split('|').map(|n| n.parse().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// Writes round-robin over `sockets`; returns p50, p99, max latency in ms
/// until replicas of the other hubs (all of them, with one hub) applied it.
async fn latency(
    sockets: &[std::path::PathBuf],
    replicas: &[Vec<(Client, SyncHandle, Applied)>],
) -> Result<[f64; 3], BoxError> {
    let writers: Vec<Client> = sockets
        .iter()
        .map(|s| Client::connect(Endpoint::Unix(s.clone()), ClientOptions::new("writer")))
        .collect();
    for writer in &writers {
        writer.wait_connected().await;
    }
    let payload = "x".repeat(1000);
    let mut writes = Vec::with_capacity(WRITES);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    for seq in 0..WRITES {
        tick.tick().await;
        let on = seq % writers.len();
        let sent = Instant::now();
        let revision = writers[on]
            .set("bench", &json!({"seq": seq, "payload": payload}), None)
            .await?;
        writes.push((revision, sent, on));
    }
    let last = writes.iter().map(|w| w.0).max().ok_or("no writes")?;
    for group in replicas {
        for (_, handle, _) in group {
            handle.wait_for_revision(last).await?;
        }
    }
    let mut latencies: Vec<Duration> = writes
        .iter()
        .map(|(revision, sent, on)| {
            replicas
                .iter()
                .enumerate()
                .filter(|(hub, _)| replicas.len() == 1 || hub != on)
                .flat_map(|(_, group)| group.iter())
                .map(|(_, _, log)| {
                    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                    log.iter()
                        .find(|(r, _)| r >= revision)
                        .map_or(Duration::MAX, |(_, at)| at.saturating_duration_since(*sent))
                })
                .max()
                .unwrap_or_default()
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    Ok([ms(pct(0.5)), ms(pct(0.99)), ms(pct(1.0))])
}

/// Two compare-and-set writers per hub on one topic for a few seconds;
/// commits per second.
async fn contention(sockets: &[std::path::PathBuf]) -> Result<f64, BoxError> {
    let clients: Vec<Client> = sockets
        .iter()
        .flat_map(|s| [s.clone(), s.clone()])
        .map(|s| Client::connect(Endpoint::Unix(s), ClientOptions::new("cas")))
        .collect();
    let until = Instant::now() + Duration::from_secs(CONTENTION_SECS);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                client.wait_connected().await;
                let mut won = 0u64;
                while Instant::now() < until {
                    let Ok((revision, data)) = client.get_json("contended").await else {
                        continue;
                    };
                    let value = serde_json::from_slice::<u64>(&data).unwrap_or(0);
                    match client.set("contended", &(value + 1), Some(revision)).await {
                        Ok(_) => won += 1,
                        Err(ClientError::Conflict { .. }) => {}
                        Err(e) => return Err::<u64, ClientError>(e),
                    }
                }
                Ok(won)
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        won += task.await??;
    }
    Ok(won as f64 / CONTENTION_SECS as f64)
}

fn main() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let (Ok(engine), Ok(socket)) = (std::env::var(HUB_ENV), std::env::var(SOCKET_ENV)) {
        return runtime.block_on(hub_child(engine, socket));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let postgres = args.iter().any(|a| a == "--postgres");
    let per_hub: usize = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(300);
    let limit = rlimit::increase_nofile_limit(16_384)?;
    eprintln!("open-file limit {limit}");
    let dir = tempfile::tempdir()?;
    let engine = Engine::start(postgres);
    runtime.block_on(async {
        // Three hubs on the engine.
        let hubs: Vec<HubProcess> = (0..3)
            .map(|i| HubProcess::start(&engine.url(), &dir.path().join(format!("hub-{i}.sock"))))
            .collect::<Result<_, _>>()?;
        let sockets: Vec<_> = hubs.iter().map(|h| h.socket.clone()).collect();
        let mut groups = Vec::new();
        for socket in &sockets {
            groups.push(replicas_on(socket, per_hub).await?);
        }
        let (commands_before, reads_before) = engine.commands();
        let cluster = latency(&sockets, &groups).await?;
        let (commands_after, reads_after) = engine.commands();
        drop(groups);
        let cluster_commits = contention(&sockets).await?;

        // The baseline: one hub, as many replicas, in memory.
        let single = HubProcess::start("memory", &dir.path().join("single.sock"))?;
        let single_sockets = vec![single.socket.clone()];
        let single_groups = vec![replicas_on(&single.socket, per_hub * 3).await?];
        let alone = latency(&single_sockets, &single_groups).await?;
        drop(single_groups);
        let single_commits = contention(&single_sockets).await?;

        let per_write = |a: u64, b: u64| ((a - b) as f64 / WRITES as f64 * 100.0).round() / 100.0;
        println!("{}", json!({
            "setup": format!("3 hubs on {} × {per_hub} replicas", engine.name()),
            "writes": WRITES, "rate_per_sec": RATE_PER_SEC, "document_bytes": 1000,
            "cross_hub_p50_ms": cluster[0], "cross_hub_p99_ms": cluster[1], "cross_hub_max_ms": cluster[2],
            "engine_commands_per_write": per_write(commands_after, commands_before),
            "engine_reads_per_write": per_write(reads_after, reads_before),
            "cas_commits_per_sec": cluster_commits.round(),
        }));
        println!("{}", json!({
            "setup": format!("1 hub in memory × {} replicas", per_hub * 3),
            "p50_ms": alone[0], "p99_ms": alone[1], "max_ms": alone[2],
            "cas_commits_per_sec": single_commits.round(),
        }));
        println!("{}", json!({
            "cluster_over_single_p50": (cluster[0] / alone[0] * 100.0).round() / 100.0,
            "cluster_over_single_p99": (cluster[1] / alone[1] * 100.0).round() / 100.0,
            "cluster_over_single_commits": (cluster_commits / single_commits * 100.0).round() / 100.0,
        }));
        Ok(())
    })
}
