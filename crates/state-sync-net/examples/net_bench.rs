//! Load generator: N subscribed replicas over Unix sockets or WebSocket,
//! one writer at a steady rate; convergence latency, fetches and bytes per
//! write, server RSS. One JSON line per configuration.
//!
//! Each configuration runs in two modes: `inline` (the default: snapshots
//! ride in the invalidations) and `pull` (every replica fetches after each
//! invalidation).
//!
//! ```text
//! cargo run --release -p state-sync-net --example net_bench
//! cargo run --release -p state-sync-net --example net_bench -- 1000 unix        # both modes
//! cargo run --release -p state-sync-net --example net_bench -- 1000 unix pull   # one mode
//! cargo run --release -p state-sync-net --example net_bench -- idle             # memory
//! ```
//!
//! `idle` measures the server's memory per idle connection: a fresh server
//! per transport, its RSS before, then with 1 000 and 3 000 connected
//! replicas, each subscribed to one topic and idle.
//!
//! The server runs in a child process (this example, re-executed), so its
//! RSS is its own. Latency is measured per write from just before the
//! writer sends `set` until every replica has applied that revision (or a
//! newer one).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use state_sync::{RetryPolicy, Revision, SnapshotEnvelope, SyncHandle, applier};
use state_sync_hub::Hub;
use state_sync_net::{Client, ClientOptions, Endpoint, Server, ServerConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SERVER_ENV: &str = "STATE_SYNC_NET_BENCH_SERVER";
const WRITES: usize = 100;
const RATE_PER_SEC: u64 = 20;

/// The child: a hub and a server; prints its addresses, answers `stats`
/// lines on stdin with the server's counters.
async fn server_child(dir: String) -> Result<(), BoxError> {
    let hub = Hub::in_memory();
    hub.json_topic("bench").await?;
    let server = Server::with_config(
        hub,
        ServerConfig::default(),
        state_sync_net::AccessConfig::open(),
    );
    let socket = server.listen_unix(format!("{dir}/bench.sock")).await?;
    let ws = server.listen_websocket("127.0.0.1:0").await?;
    println!("{}", json!({"socket": socket, "ws": format!("ws://{ws}")}));
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    while let Some(_line) = lines.next_line().await? {
        let s = server.stats();
        println!(
            "{}",
            json!({
                "fetched": s.snapshots_sent,
                "inlined": s.snapshots_inlined,
                "bytes": s.snapshot_bytes_sent + s.snapshot_bytes_inlined,
                "connections": s.connections,
                "subscriptions": s.subscriptions,
            })
        );
    }
    Ok(())
}

struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    socket: String,
    ws: String,
}

impl ServerProcess {
    fn start(dir: &std::path::Path) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(SERVER_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let ready: Value = serde_json::from_str(&line)?;
        Ok(ServerProcess {
            socket: ready["socket"].as_str().ok_or("socket")?.to_owned(),
            ws: ready["ws"].as_str().ok_or("ws")?.to_owned(),
            child,
            stdin,
            stdout,
        })
    }

    /// The child's counters, as it prints them.
    fn counters(&mut self) -> Result<Value, BoxError> {
        writeln!(self.stdin, "stats")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Snapshots fetched, snapshots inlined, snapshot bytes sent.
    fn stats(&mut self) -> Result<[u64; 3], BoxError> {
        let v = self.counters()?;
        Ok(["fetched", "inlined", "bytes"].map(|k| v[k].as_u64().unwrap_or(0)))
    }

    /// Open connections and subscriptions.
    fn connections(&mut self) -> Result<(u64, u64), BoxError> {
        let v = self.counters()?;
        let count = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok((count("connections"), count("subscriptions")))
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per replica: (revision, when applied), in apply order.
type Applied = Arc<Mutex<Vec<(Revision, Instant)>>>;

async fn run(
    server: &mut ServerProcess,
    transport: &str,
    replicas: usize,
    mode: &str,
) -> Result<(f64, f64), BoxError> {
    let endpoint = match transport {
        "unix" => Endpoint::Unix(server.socket.clone().into()),
        _ => Endpoint::WebSocket(server.ws.clone()),
    };
    let mut handles = Vec::with_capacity(replicas);
    let mut clients = Vec::with_capacity(replicas);
    let mut logs: Vec<Applied> = Vec::with_capacity(replicas);
    for i in 0..replicas {
        // One connection per replica: each stands for one process.
        let options = ClientOptions::new(format!("replica-{i}")).inline_snapshots(mode == "inline");
        let client = Client::connect(endpoint.clone(), options);
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
        handles.push(handle);
        clients.push(client);
        logs.push(log);
    }

    let writer = Client::connect(endpoint.clone(), ClientOptions::new("writer"));
    writer.wait_connected().await;
    let before = server.stats()?;
    let payload = "x".repeat(200);
    let mut writes = Vec::with_capacity(WRITES);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    for seq in 0..WRITES {
        tick.tick().await;
        let sent = Instant::now();
        let revision = writer
            .set("bench", &json!({"seq": seq, "payload": payload}), None)
            .await?;
        writes.push((revision, sent));
    }
    let last = writes.last().map(|w| w.0).ok_or("no writes")?;
    for handle in &handles {
        handle.wait_for_revision(last).await?;
    }
    let after = server.stats()?;
    let per_write = |i: usize| (after[i] - before[i]) as f64 / WRITES as f64;

    let mut latencies: Vec<Duration> = writes
        .iter()
        .map(|(revision, sent)| {
            logs.iter()
                .map(|log| {
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
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99) = (ms(pct(0.5)), ms(pct(0.99)));
    println!(
        "{}",
        json!({
            "transport": transport,
            "replicas": replicas,
            "mode": mode,
            "writes": WRITES,
            "rate_per_sec": RATE_PER_SEC,
            "p50_ms": (p50 * 100.0).round() / 100.0,
            "p99_ms": (p99 * 100.0).round() / 100.0,
            "max_ms": (ms(pct(1.0)) * 100.0).round() / 100.0,
            "fetches_per_write": (per_write(0) * 10.0).round() / 10.0,
            "inlined_per_write": (per_write(1) * 10.0).round() / 10.0,
            "bytes_per_write": per_write(2).round(),
            "server_rss_mib": server.rss_kib() / 1024,
        })
    );
    for handle in &handles {
        handle.stop().await;
    }
    drop(clients);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((p50, p99))
}

fn main() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Ok(dir) = std::env::var(SERVER_ENV) {
        return runtime.block_on(server_child(dir));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("idle") {
        return runtime.block_on(idle_memory());
    }
    let configs: Vec<(usize, String, String)> = match args.as_slice() {
        [n, transport, mode] => vec![(n.parse()?, transport.clone(), mode.clone())],
        [n, transport] => ["inline", "pull"]
            .map(|mode| (n.parse(), transport.clone(), mode.to_owned()))
            .into_iter()
            .map(|(n, t, m)| Ok::<_, std::num::ParseIntError>((n?, t, m)))
            .collect::<Result<_, _>>()?,
        _ => {
            let mut all = Vec::new();
            for n in [100, 1000] {
                for transport in ["unix", "websocket"] {
                    for mode in ["inline", "pull"] {
                        all.push((n, transport.to_owned(), mode.to_owned()));
                    }
                }
            }
            all
        }
    };
    let dir = tempfile::tempdir()?;
    runtime.block_on(async {
        let mut server = ServerProcess::start(dir.path())?;
        eprintln!("server RSS at start: {} MiB", server.rss_kib() / 1024);
        let mut results = Vec::new();
        for (replicas, transport, mode) in configs {
            let latency = run(&mut server, &transport, replicas, &mode).await?;
            results.push((replicas, transport, mode, latency));
        }
        // Inline against its baseline, pull, measured in this run.
        for (replicas, transport, mode, (p50, p99)) in &results {
            let baseline = results
                .iter()
                .find(|r| (r.0, &r.1, r.2.as_str()) == (*replicas, transport, "pull"));
            if let (Some((.., (base50, base99))), "inline") = (baseline, mode.as_str()) {
                println!(
                    "{}",
                    json!({
                        "transport": transport,
                        "replicas": replicas,
                        "inline_over_pull_p50": (p50 / base50 * 100.0).round() / 100.0,
                        "inline_over_pull_p99": (p99 / base99 * 100.0).round() / 100.0,
                    })
                );
            }
        }
        Ok(())
    })
}

/// Server RSS per idle connection, at 1 000 and 3 000 subscribed replicas.
async fn idle_memory() -> Result<(), BoxError> {
    for transport in ["unix", "websocket"] {
        let dir = tempfile::tempdir()?;
        let mut server = ServerProcess::start(dir.path())?;
        let endpoint = match transport {
            "unix" => Endpoint::Unix(server.socket.clone().into()),
            _ => Endpoint::WebSocket(server.ws.clone()),
        };
        // One connection, so the topic's fan-out exists before the count.
        let mut replicas = vec![idle_replica(&endpoint, 0).await?];
        settle(&mut server, 1).await?;
        let base = server.rss_kib();
        for target in [1000, 3000] {
            while replicas.len() < target + 1 {
                replicas.push(idle_replica(&endpoint, replicas.len()).await?);
            }
            settle(&mut server, target as u64 + 1).await?;
            let rss = server.rss_kib();
            println!(
                "{}",
                json!({
                    "workload": "idle_connections",
                    "transport": transport,
                    "connections": target,
                    "server_rss_kib": rss,
                    "server_rss_at_one_kib": base,
                    "kib_per_connection": ((rss.saturating_sub(base)) as f64 / target as f64 * 100.0).round() / 100.0,
                })
            );
        }
        for (client, handle) in replicas {
            handle.stop().await;
            drop(client);
        }
    }
    Ok(())
}

/// A connected replica subscribed to `bench`, doing nothing more.
async fn idle_replica(endpoint: &Endpoint, i: usize) -> Result<(Client, SyncHandle), BoxError> {
    let client = Client::connect(endpoint.clone(), ClientOptions::new(format!("idle-{i}")));
    let remote = client.topic::<Value>("bench")?;
    let handle = SyncHandle::builder(
        remote,
        applier::from_fn(|_: SnapshotEnvelope<Value>| Ok::<(), std::convert::Infallible>(())),
    )
    .build();
    handle.start().await?;
    Ok((client, handle))
}

/// Waits until the server counts `n` subscribed connections, then a
/// second for its allocator to settle.
async fn settle(server: &mut ServerProcess, n: u64) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.connections()? != (n, n) {
        if Instant::now() > deadline {
            return Err(format!("the server did not reach {n} subscribed connections").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}
