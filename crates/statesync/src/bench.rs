//! `statesync bench`: the load generator. N replicas (one connection each)
//! follow one topic while a writer writes at a steady rate; reports
//! convergence latency (from just before a write is sent until every
//! replica applied it or a newer revision), the generator's CPU per write
//! and the hub's bytes out per write.
//!
//! Against a running hub (`--socket`, `--url`, `--local`, `--data-dir`) or,
//! without those, a temporary in-memory hub in this process.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use state_sync::{RetryPolicy, Revision, SnapshotEnvelope, SyncHandle, applier};
use state_sync_hub::Hub;
use state_sync_net::{Client, Endpoint, Server};

use crate::commands::{endpoint as hub_endpoint, fail, options};
use crate::output::say;
use crate::{HubArgs, exit};

#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Replicas, one connection each.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    clients: u32,
    /// Writes to make.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    writes: u32,
    /// Writes per second.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// Size of each written document, in bytes (a JSON object around a
    /// string of this length).
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// The topic written (default: one of its own, so a running hub's
    /// topics are left alone).
    #[arg(long, default_value = "statesync-bench:doc")]
    topic: String,
    /// For the temporary hub: `unix` or `websocket`.
    #[arg(long, default_value = "unix", value_parser = ["unix", "websocket"])]
    transport: String,
    /// Also run a baseline with the same clients, rate and latency
    /// definition, and print the hub's figures as ratios to its (repeat or
    /// separate with commas for several). `redis`: what a user would build
    /// instead, on a `redis-server` this command starts: Redis pub/sub for
    /// invalidations plus `GET` of one key, coalescing replicas.
    /// `sockets`: the floor, plain sockets of the hub's kind carrying as
    /// many bytes per replica as the hub sent, with nothing above them.
    #[arg(long, value_enum, value_delimiter = ',')]
    baseline: Vec<Baseline>,
    /// Replicas ask for whole snapshots, never deltas (to measure what
    /// deltas save).
    #[arg(long)]
    no_deltas: bool,
    /// Replicas refresh on their connection's reader, without waking
    /// their handle's worker (`SyncHandleBuilder::refresh_on_delivery`).
    #[arg(long)]
    refresh_on_delivery: bool,
    /// Sweep and draw: the same load on the hub, on the Redis baseline
    /// and on plain sockets at 100, 300 and `--clients` replicas, then at 1 KiB,
    /// 16 KiB and 64 KiB documents; writes `p99-vs-replicas.svg`,
    /// `p99-vs-document-size.svg` and `sweep.json` into this directory.
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

/// What `--baseline` runs beside the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Baseline {
    /// Redis pub/sub + `GET`, coalescing replicas.
    Redis,
    /// Plain sockets, no protocol: the kernel's floor.
    Sockets,
}

/// The load every run of one measurement shares: the hub's and each
/// baseline's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) clients: u32,
    pub(crate) writes: u32,
    pub(crate) rate: u32,
    pub(crate) payload_bytes: usize,
}

/// Per replica: (revision, when applied).
pub(crate) type Applied<R = Revision> = Arc<Mutex<Vec<(R, Instant)>>>;

/// Convergence latency over a run: per write, from just before it was sent
/// until the last replica applied it (or a newer revision).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Convergence {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Convergence {
    /// From the writes (revision, when sent) and each replica's log.
    pub(crate) fn of<R: Ord + Clone>(writes: &[(R, Instant)], logs: &[Applied<R>]) -> Convergence {
        let logs: Vec<Vec<(R, Instant)>> = logs
            .iter()
            .map(|log| log.lock().map(|l| l.clone()).unwrap_or_default())
            .collect();
        let mut latencies: Vec<Duration> = writes
            .iter()
            .map(|(revision, sent)| {
                logs.iter()
                    .map(|log| {
                        log.iter()
                            .find(|(r, _)| r >= revision)
                            .map_or(Duration::MAX, |(_, at)| at.saturating_duration_since(*sent))
                    })
                    .max()
                    .unwrap_or_default()
            })
            .collect();
        latencies.sort();
        let at = |p: f64| {
            let i = ((latencies.len().max(1) as f64 - 1.0) * p).round() as usize;
            latencies.get(i).copied().unwrap_or_default()
        };
        let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        Convergence {
            p50_ms: ms(at(0.5)),
            p99_ms: ms(at(0.99)),
            max_ms: ms(at(1.0)),
        }
    }
}

pub(crate) async fn run(args: BenchArgs) -> u8 {
    if let Some(dir) = args.plot.clone() {
        return match sweep(&args, &dir).await {
            Ok(summary) => {
                say(if args.json {
                    summary.to_string()
                } else {
                    format!(
                        "{}\nplots: {}",
                        serde_json::to_string_pretty(&summary).unwrap_or_default(),
                        dir.display()
                    )
                });
                exit::OK
            }
            Err(code) => code,
        };
    }
    match measure(&args).await {
        Ok(result) => {
            if args.json {
                say(result);
            } else {
                say(table(&result));
            }
            exit::OK
        }
        Err(code) => code,
    }
}

/// The hub's run and, with `--baseline`, each baseline's beside it.
async fn measure(args: &BenchArgs) -> Result<Value, u8> {
    let hub = bench(args).await?;
    if args.baseline.is_empty() {
        return Ok(hub);
    }
    let load = Load {
        clients: args.clients,
        writes: args.writes,
        rate: args.rate,
        payload_bytes: args.payload_bytes,
    };
    let mut result = json!({ "hub": hub });
    for baseline in &args.baseline {
        match baseline {
            Baseline::Redis => {
                let redis = crate::bench_redis::run(load)
                    .await
                    .map_err(|e| fail(exit::FAILURE, format!("the Redis baseline failed: {e}")))?;
                result["hub_over_redis"] = over_redis(&result["hub"], &redis);
                result["redis"] = redis;
            }
            Baseline::Sockets => {
                let transport = sockets_transport(args)?;
                let frame_bytes = bytes_per_replica(&result["hub"]).unwrap_or(args.payload_bytes);
                let sockets = crate::bench_sockets::run(load, transport, frame_bytes)
                    .await
                    .map_err(|e| {
                        fail(exit::FAILURE, format!("the sockets baseline failed: {e}"))
                    })?;
                result["hub_over_sockets"] = over_sockets(&result["hub"], &sockets);
                result["sockets"] = sockets;
            }
        }
    }
    Ok(result)
}

/// The floor's sockets: TCP under a WebSocket hub, Unix sockets otherwise.
fn sockets_transport(args: &BenchArgs) -> Result<crate::bench_sockets::Transport, u8> {
    let websocket = if args.hub.names_a_hub() {
        matches!(hub_endpoint(&args.hub), Endpoint::WebSocket(_))
    } else {
        args.transport == "websocket"
    };
    if websocket {
        return Ok(crate::bench_sockets::Transport::Tcp);
    }
    #[cfg(unix)]
    return Ok(crate::bench_sockets::Transport::Unix);
    #[cfg(not(unix))]
    Err(fail(
        exit::BAD_INPUT,
        "on this platform the sockets baseline measures TCP only: bench a WebSocket hub",
    ))
}

/// What the hub sent each replica per write, in bytes.
fn bytes_per_replica(hub: &Value) -> Option<usize> {
    let bytes = hub["hub_bytes_out_per_write"].as_f64()?;
    let clients = hub["clients"].as_f64().filter(|c| *c > 0.0)?;
    Some((bytes / clients).round() as usize)
}

/// `--plot`: p99 against replicas, then against document size, hub, Redis
/// and the floor at every point.
async fn sweep(args: &BenchArgs, dir: &std::path::Path) -> Result<Value, u8> {
    std::fs::create_dir_all(dir).map_err(|e| fail(exit::FAILURE, e))?;
    let base = BenchArgs {
        baseline: vec![Baseline::Redis, Baseline::Sockets],
        json: true,
        plot: None,
        ..args.clone()
    };
    let mut replica_counts: Vec<u32> = [100, 300]
        .into_iter()
        .filter(|n| *n < args.clients)
        .collect();
    replica_counts.push(args.clients);
    let mut by_replicas = Vec::new();
    for clients in replica_counts {
        let point = measure(&BenchArgs {
            clients,
            ..base.clone()
        })
        .await?;
        by_replicas.push((f64::from(clients), point));
    }
    let mut by_size = Vec::new();
    for payload_bytes in [1024, 16 * 1024, 64 * 1024] {
        let point = measure(&BenchArgs {
            payload_bytes,
            ..base.clone()
        })
        .await?;
        by_size.push((payload_bytes as f64, point));
    }
    let plots = [
        (
            "p99-vs-replicas.svg",
            format!(
                "p99 against replicas ({} B documents, {} writes/s)",
                args.payload_bytes, args.rate
            ),
            "replicas",
            &by_replicas,
        ),
        (
            "p99-vs-document-size.svg",
            format!(
                "p99 against document size ({} replicas, {} writes/s)",
                args.clients, args.rate
            ),
            "document bytes",
            &by_size,
        ),
    ];
    for (file, title, x_label, points) in plots {
        crate::bench_plot::draw(
            &dir.join(file),
            &title,
            x_label,
            &crate::bench_plot::series_of(points),
        )
        .map_err(|e| fail(exit::FAILURE, format!("cannot draw {file}: {e}")))?;
    }
    let summary = crate::bench_plot::summary(&by_replicas, &by_size);
    std::fs::write(
        dir.join("sweep.json"),
        serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    )
    .map_err(|e| fail(exit::FAILURE, e))?;
    Ok(summary)
}

async fn bench(args: &BenchArgs) -> Result<Value, u8> {
    // A temporary hub unless one was named.
    let temporary = !args.hub.names_a_hub();
    let dir = tempfile::tempdir().map_err(|e| fail(exit::FAILURE, e))?;
    let (server, endpoint) = if temporary {
        let hub = Hub::in_memory();
        let server = Server::new(hub);
        let endpoint = if args.transport == "websocket" {
            let addr = server
                .listen_websocket("127.0.0.1:0")
                .await
                .map_err(|e| fail(exit::FAILURE, e))?;
            Endpoint::WebSocket(format!("ws://{addr}"))
        } else {
            crate::platform::listen(&server, &Endpoint::Unix(dir.path().join("bench.sock")))
                .await
                .map_err(|e| fail(exit::FAILURE, e))?;
            Endpoint::Unix(dir.path().join("bench.sock"))
        };
        (Some(server), endpoint)
    } else {
        (None, hub_endpoint(&args.hub))
    };
    let options = |name: &str| options(&args.hub, name).map(|o| o.delta_snapshots(!args.no_deltas));
    let writer = Client::connect(endpoint.clone(), options("statesync-bench-writer")?);
    if tokio::time::timeout(Duration::from_secs(10), writer.wait_connected())
        .await
        .is_err()
    {
        return Err(fail(
            exit::FAILURE,
            format!("cannot reach the hub at {endpoint}"),
        ));
    }
    let payload = "x".repeat(args.payload_bytes);
    let document = |seq: u32| json!({"seq": seq, "payload": payload});
    writer
        .set(&args.topic, &document(0), None)
        .await
        .map_err(|e| fail(exit::FAILURE, e))?;

    let progress = Progress::new(!args.json);
    let mut replicas = Vec::with_capacity(args.clients as usize);
    for i in 0..args.clients {
        let client = Client::connect(endpoint.clone(), options(&format!("statesync-bench-{i}"))?);
        let remote = client
            .topic::<Value>(&args.topic)
            .map_err(|e| fail(exit::BAD_INPUT, e))?;
        let log: Applied = Arc::new(Mutex::new(Vec::with_capacity(args.writes as usize + 1)));
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
        .retry(RetryPolicy::default().max_attempts(20).jitter(true))
        .refresh_on_delivery(args.refresh_on_delivery)
        .build();
        match tokio::time::timeout(Duration::from_secs(30), handle.start()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(fail(
                    exit::FAILURE,
                    format!("replica {i} did not start: {}", state_sync::ErrorChain(&e)),
                ));
            }
            Err(_) => {
                return Err(fail(
                    exit::FAILURE,
                    format!("replica {i} did not start within 30 s"),
                ));
            }
        }
        replicas.push((client, handle, log));
        progress.show(format_args!("replicas {}/{}", i + 1, args.clients));
    }
    let stats_before = writer.hub_status().await.ok();
    let cpu_before = cpu_time();
    let mut writes = Vec::with_capacity(args.writes as usize);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1..=args.writes {
        tick.tick().await;
        let sent = Instant::now();
        let revision = writer
            .set(&args.topic, &document(seq), None)
            .await
            .map_err(|e| fail(exit::FAILURE, e))?;
        writes.push((revision, sent));
        progress.show(format_args!("writes {seq}/{}", args.writes));
    }
    let last = writes.last().map_or(Revision::ZERO, |w| w.0);
    for (_, handle, _) in &replicas {
        let reached = tokio::time::timeout(Duration::from_secs(60), handle.wait_for_revision(last));
        if !matches!(reached.await, Ok(Ok(_))) {
            return Err(fail(
                exit::FAILURE,
                "a replica did not converge within 60 s",
            ));
        }
    }
    let cpu_ms = cpu_ms_since(cpu_before);
    let stats_after = writer.hub_status().await.ok();
    progress.done();

    let logs: Vec<Applied> = replicas.iter().map(|(_, _, log)| log.clone()).collect();
    let latency = Convergence::of(&writes, &logs);
    let per_write = |total: f64| per_write(total, args.writes);
    let per_write_of = |counter: fn(&state_sync_net::ServerStats) -> u64| {
        stats_before
            .as_ref()
            .zip(stats_after.as_ref())
            .map(|(before, after)| {
                per_write((counter(&after.stats) - counter(&before.stats)) as f64)
            })
    };
    let snapshot_bytes = per_write_of(|s| s.snapshot_bytes_sent + s.snapshot_bytes_inlined);
    let bytes_out = per_write_of(|s| s.bytes_sent);
    let deltas = per_write_of(|s| s.snapshots_as_deltas);
    let delta_micros = per_write_of(|s| s.delta_micros);
    // A temporary hub runs in this process: its CPU is in the client's.
    let hub_cpu = stats_before
        .as_ref()
        .and_then(|s| s.process)
        .zip(stats_after.as_ref().and_then(|s| s.process))
        .filter(|_| !temporary)
        .map(|(before, after)| per_write(after.cpu_ms.saturating_sub(before.cpu_ms) as f64));
    for (_, handle, _) in replicas {
        handle.stop().await;
    }
    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(json!({
        "hub": if temporary { format!("temporary, in memory, {}", args.transport) } else { endpoint.to_string() },
        "clients": args.clients,
        "writes": args.writes,
        "rate_per_sec": args.rate,
        "payload_bytes": args.payload_bytes,
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
        "max_ms": latency.max_ms,
        "client_cpu_ms_per_write": cpu_ms.map(per_write),
        "hub_cpu_ms_per_write": hub_cpu,
        "deltas": !args.no_deltas,
        "refresh_on_delivery": args.refresh_on_delivery,
        "hub_snapshot_bytes_per_write": snapshot_bytes,
        "hub_bytes_out_per_write": bytes_out,
        "deltas_per_write": deltas,
        "hub_delta_us_per_write": delta_micros,
    }))
}

/// `a / b` to two decimals, where both are numbers and `b` is not zero.
fn ratio(a: &Value, b: &Value) -> Option<f64> {
    a.as_f64()
        .zip(b.as_f64())
        .filter(|(_, b)| *b > 0.0)
        .map(|(a, b)| (a / b * 100.0).round() / 100.0)
}

/// The hub's figures over Redis's.
fn over_redis(hub: &Value, redis: &Value) -> Value {
    json!({
        "p50": ratio(&hub["p50_ms"], &redis["p50_ms"]),
        "p99": ratio(&hub["p99_ms"], &redis["p99_ms"]),
        "bytes_per_write": ratio(&hub["hub_bytes_out_per_write"], &redis["redis_bytes_out_per_write"]),
    })
}

/// The hub's figures over the floor's. CPU is the hub's and its clients'
/// together, as the floor's is its senders' and receivers'.
fn over_sockets(hub: &Value, sockets: &Value) -> Value {
    let cpu = hub["client_cpu_ms_per_write"]
        .as_f64()
        .map(|client| client + hub["hub_cpu_ms_per_write"].as_f64().unwrap_or(0.0));
    json!({
        "p50": ratio(&hub["p50_ms"], &sockets["p50_ms"]),
        "p99": ratio(&hub["p99_ms"], &sockets["p99_ms"]),
        "cpu_per_write": ratio(&json!(cpu), &sockets["cpu_ms_per_write"]),
    })
}

fn table(result: &Value) -> String {
    if result.get("hub").is_some_and(Value::is_object) {
        let mut text = table(&result["hub"]);
        let redis = &result["redis"];
        if !redis.is_null() {
            text += &format!(
                "\n\nbaseline: Redis pub/sub + GET, {} coalescing replicas\n\
                 convergence: p50 {} ms, p99 {} ms, max {} ms\n\
                 CPU per write: client {} ms, Redis {} ms; Redis bytes out per write: {}\n\
                 hub over Redis: p50 {}, p99 {}, bytes per write {}",
                redis["clients"],
                redis["p50_ms"],
                redis["p99_ms"],
                redis["max_ms"],
                redis["client_cpu_ms_per_write"],
                redis["redis_cpu_ms_per_write"],
                redis["redis_bytes_out_per_write"],
                result["hub_over_redis"]["p50"],
                result["hub_over_redis"]["p99"],
                result["hub_over_redis"]["bytes_per_write"],
            );
        }
        let sockets = &result["sockets"];
        if !sockets.is_null() {
            text += &format!(
                "\n\nbaseline: plain {} sockets (the floor), {} connections, {} B each per write, {} threads each way\n\
                 convergence: p50 {} ms, p99 {} ms, max {} ms; CPU per write: {} ms\n\
                 hub over the floor: p50 {}, p99 {}, CPU per write {}",
                sockets["transport"].as_str().unwrap_or("?"),
                sockets["clients"],
                sockets["frame_bytes"],
                sockets["threads"],
                sockets["p50_ms"],
                sockets["p99_ms"],
                sockets["max_ms"],
                sockets["cpu_ms_per_write"],
                result["hub_over_sockets"]["p50"],
                result["hub_over_sockets"]["p99"],
                result["hub_over_sockets"]["cpu_per_write"],
            );
        }
        return text;
    }
    let show = |key: &str| match &result[key] {
        Value::Null => "n/a".to_owned(),
        other => other.to_string(),
    };
    format!(
        "statesync bench: {} replicas on {}, {} writes of {} B at {}/s\n\
         convergence (write sent → every replica applied): p50 {} ms, p99 {} ms, max {} ms\n\
         CPU per write: client {} ms, hub {} ms; hub bytes out per write: {} (snapshots: {}; deltas: {})",
        show("clients"),
        result["hub"].as_str().unwrap_or("?"),
        show("writes"),
        show("payload_bytes"),
        show("rate_per_sec"),
        show("p50_ms"),
        show("p99_ms"),
        show("max_ms"),
        show("client_cpu_ms_per_write"),
        show("hub_cpu_ms_per_write"),
        show("hub_bytes_out_per_write"),
        show("hub_snapshot_bytes_per_write"),
        show("deltas_per_write"),
    )
}

/// `total` spread over `writes`, to two decimals, as every figure the
/// bench prints per write.
pub(crate) fn per_write(total: f64, writes: u32) -> f64 {
    (total / f64::from(writes) * 100.0).round() / 100.0
}

/// This process's CPU time, where the platform tells it.
pub(crate) fn cpu_time() -> Option<Duration> {
    cpu_time::ProcessTime::try_now()
        .ok()
        .map(|t| t.as_duration())
}

/// This process's CPU time since `before` (read by [`cpu_time()`]), in ms.
pub(crate) fn cpu_ms_since(before: Option<Duration>) -> Option<f64> {
    cpu_time()
        .zip(before)
        .map(|(after, before)| (after - before).as_secs_f64() * 1e3)
}

/// Progress on stderr, redrawn in place on a terminal.
struct Progress {
    on: bool,
    terminal: bool,
    last: Mutex<Option<Instant>>,
}

impl Progress {
    fn new(on: bool) -> Progress {
        Progress {
            on,
            terminal: std::io::stderr().is_terminal(),
            last: Mutex::new(None),
        }
    }

    fn show(&self, what: std::fmt::Arguments<'_>) {
        if !self.on {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        // Every line on a terminal; once a second elsewhere (logs).
        let due = self.terminal || last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if !due {
            return;
        }
        *last = Some(Instant::now());
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "{what}\x1b[K\r");
            let _ = err.flush();
        } else {
            crate::output::complain(what);
        }
    }

    fn done(&self) {
        if self.on && self.terminal {
            let _ = write!(std::io::stderr().lock(), "\x1b[K");
        }
    }
}
