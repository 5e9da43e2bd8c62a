//! `statesync demo`: the whole system, live, in one command.
//!
//! A hub process on a temporary store, replica processes (`statesync
//! watch`), two writers racing compare-and-set increments (conflicts are
//! detected and retried), a hub killed and restarted in the middle, and a
//! summary once every replica holds the hub's final revision.
//!
//! With `--redis` or `--postgres`, three hubs share that engine: replicas
//! are spread over them, the writers use different hubs, and one of the
//! hubs is killed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;
use state_sync::Revision;
use state_sync_net::{Client, ClientOptions, Error as ClientError};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::exit;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Replica processes to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    replicas: u32,
    /// Increments each of the two writers makes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    writes: u64,
    /// Pause of each writer between two writes, in milliseconds (to watch
    /// it happen).
    #[arg(long, default_value_t = 15)]
    pace_ms: u64,
    /// Keep the hubs running after the summary, until Ctrl-C, to look
    /// around in the live view or with `statesync status`.
    #[arg(long)]
    keep_running: bool,
    /// With an engine: three hubs sharing it (the demo writes only the
    /// topic `statesync-demo:counter` there).
    #[command(flatten)]
    engine: crate::EngineArgs,
}

/// What each replica last applied, per topic: (revision, data).
type Seen = Arc<Mutex<Vec<BTreeMap<String, (Revision, Value)>>>>;

// Namespaced: on a shared engine, the demo must not touch real topics.
const TOPIC: &str = "statesync-demo:counter";

pub(crate) async fn run(args: DemoArgs) -> u8 {
    match demo(args).await {
        Ok(true) => exit::OK,
        Ok(false) => exit::FAILURE,
        Err(e) => {
            eprintln!("statesync demo: {e}");
            exit::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new()
        .prefix("statesync-demo-")
        .tempdir()?;
    let exe = std::env::current_exe()?;
    // One hub on a temporary file store, or three on a shared engine.
    // Given to the hubs through their environment: a password in a URL
    // stays out of the process list.
    let (engine, engine_name): (Vec<(&str, String)>, Option<&str>) =
        match (&args.engine.redis, &args.engine.postgres) {
            (Some(url), _) => (vec![("STATESYNC_REDIS_URL", url.clone())], Some("Redis")),
            (None, Some(config)) => (
                vec![("STATESYNC_POSTGRES_URL", config.clone())],
                Some("PostgreSQL"),
            ),
            (None, None) => (Vec::new(), None),
        };
    let hub_count = if engine_name.is_some() { 3 } else { 1 };
    let dirs: Vec<_> = (0..hub_count)
        .map(|i| dir.path().join(format!("hub-{i}")))
        .collect();
    let endpoints: Vec<_> = dirs
        .iter()
        .map(|d| crate::platform::default_endpoint(d))
        .collect();
    match engine_name {
        Some(name) => println!("statesync demo — {hub_count} hubs sharing {name}"),
        None => println!("statesync demo — hub store in {}", dirs[0].display()),
    }
    // The first hub also serves WebSocket and the live view, on a port
    // that stays the same when it restarts.
    let ws = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let ws = ws.to_string();
    let mut hubs = Vec::new();
    for (i, (dir, endpoint)) in dirs.iter().zip(&endpoints).enumerate() {
        let ws = (i == 0).then_some(ws.as_str());
        hubs.push(start_hub(&exe, dir, &engine, ws).await?);
        println!("hub listening on {endpoint}");
    }
    println!("live view: http://{ws}/ (open it in a browser; no token needed)");

    let seen: Seen = Arc::new(Mutex::new(vec![BTreeMap::new(); args.replicas as usize]));
    let fetched = Arc::new(AtomicU64::new(0));
    let mut replicas = Vec::new();
    for i in 0..args.replicas as usize {
        replicas.push(start_replica(
            &exe,
            &dirs[i % hub_count],
            i,
            seen.clone(),
            fetched.clone(),
        )?);
    }
    println!("{} replica processes watching `{TOPIC}`", args.replicas);

    // The topic starts at 0; every later write is a compare-and-set.
    let setup = Client::connect(endpoints[0].clone(), ClientOptions::new("demo"));
    setup.wait_connected().await;
    setup.set(TOPIC, &0u64, None).await?;

    let conflicts = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let total = args.writes * 2;
    // On several hubs, the writers use the first and the last.
    let writers: Vec<_> = [("writer-a", 0), ("writer-b", hub_count - 1)]
        .into_iter()
        .map(|(name, hub)| {
            let client = Client::connect(endpoints[hub].clone(), ClientOptions::new(name));
            tokio::spawn(increment_loop(
                client,
                args.writes,
                Duration::from_millis(args.pace_ms),
                conflicts.clone(),
                done.clone(),
                unknown.clone(),
            ))
        })
        .collect();

    // Live view; the hub is killed and restarted halfway.
    let started = Instant::now();
    let live = std::io::stdout().is_terminal();
    let mut restarted = false;
    // Whether the last thing printed is the live view (to redraw in place).
    let mut drawn = false;
    let mut last_print = Instant::now();
    while done.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let progress = done.load(Ordering::Relaxed);
        if !restarted && progress >= total / 2 {
            // The middle hub: on three hubs, one neither writer uses.
            let victim = hub_count / 2;
            hubs[victim].kill().await?;
            let store = if engine_name.is_some() {
                "the shared engine"
            } else {
                "the same store"
            };
            println!(
                "\n*** hub killed (SIGKILL) after {progress} of {total} writes; restarting on {store}"
            );
            let victim_ws = (victim == 0).then_some(ws.as_str());
            hubs[victim] = start_hub(&exe, &dirs[victim], &engine, victim_ws).await?;
            println!("*** hub back; writers and replicas reconnect and resync\n");
            restarted = true;
            drawn = false;
        }
        if live || last_print.elapsed() > Duration::from_secs(1) {
            render(
                &seen,
                progress,
                total,
                conflicts.load(Ordering::Relaxed),
                live && drawn,
            );
            drawn = true;
            last_print = Instant::now();
        }
    }
    for writer in writers {
        writer.await??;
    }

    // The final state, read from the hub; wait until every replica has it.
    setup.wait_connected().await;
    let (final_revision, final_data) = setup.get_json(TOPIC).await?;
    let final_value: Value = serde_json::from_slice(&final_data)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let converged = loop {
        let all = seen
            .lock()
            .map(|s| {
                s.iter()
                    .all(|r| r.get(TOPIC).is_some_and(|(rev, _)| *rev == final_revision))
            })
            .unwrap_or(false);
        if all || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    render(
        &seen,
        total,
        total,
        conflicts.load(Ordering::Relaxed),
        live && drawn,
    );

    for replica in &mut replicas {
        let _ = replica.kill().await;
    }
    if args.keep_running {
        println!(
            "\nhubs still running (live view: http://{ws}/, socket {}); Ctrl-C stops them",
            endpoints[0]
        );
        crate::platform::shutdown_signal().await;
    }
    for hub in &mut hubs {
        crate::platform::terminate(hub).await;
    }

    // Every acknowledged increment is in; one whose answer died with the
    // hub may be in too.
    let unknown = unknown.load(Ordering::Relaxed);
    let counted = final_value.as_u64().unwrap_or(0);
    let correct = (total..=total + unknown).contains(&counted);
    let expected = if unknown == 0 {
        total.to_string()
    } else {
        format!("{total} to {}", total + unknown)
    };
    println!("\n── summary ──────────────────────────────────────────");
    println!("writes committed      {total} (two writers, compare-and-set increments)");
    println!(
        "conflicts detected    {} (each retried on the new revision)",
        conflicts.load(Ordering::Relaxed)
    );
    match engine_name {
        Some(name) => println!(
            "hub restarts          1 of {hub_count} hubs sharing {name} (SIGKILL mid-stream)"
        ),
        None => println!("hub restarts          1 (SIGKILL mid-stream, same store)"),
    }
    if unknown > 0 {
        println!(
            "answers lost          {unknown} (sets in flight when the hub died: committed or not, then retried)"
        );
    }
    println!(
        "replica applies       {} snapshots applied by {} replicas for {} revisions (invalidations coalesce)",
        fetched.load(Ordering::Relaxed),
        args.replicas,
        total + 1
    );
    println!(
        "final value           {final_value} (expected {expected}: {})",
        if correct {
            "no acknowledged update lost"
        } else {
            "UPDATES LOST"
        }
    );
    println!("final revision        {final_revision}");
    let revisions: Vec<String> = seen
        .lock()
        .map(|s| {
            s.iter()
                .map(|r| {
                    r.get(TOPIC)
                        .map_or("-".to_owned(), |(rev, _)| rev.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    println!("replica revisions     {}", revisions.join(", "));
    println!(
        "converged             {} in {:.1} s",
        if converged {
            "yes, all replicas equal the hub"
        } else {
            "NO"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(converged && correct)
}

/// Increments the counter `writes` times with compare-and-set, retrying on
/// conflicts and while the hub is away.
/// Compare-and-set increments until `writes` of them were acknowledged.
/// A `set` whose answer was lost with the killed hub may or may not have
/// been committed: counted in `unknown`, then tried again.
async fn increment_loop(
    client: Client,
    writes: u64,
    pace: Duration,
    conflicts: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    unknown: Arc<AtomicU64>,
) -> Result<(), ClientError> {
    client.wait_connected().await;
    let mut made = 0;
    while made < writes {
        let (revision, data) = match client.get_json(TOPIC).await {
            Ok(current) => current,
            Err(ClientError::Disconnected | ClientError::Timeout(_)) => {
                // The hub is restarting; the client reconnects by itself.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let value: u64 = serde_json::from_slice(&data).unwrap_or(0);
        match client.set(TOPIC, &(value + 1), Some(revision)).await {
            Ok(_) => {
                made += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(ClientError::Conflict { .. }) => {
                conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(ClientError::Disconnected | ClientError::Timeout(_)) => {
                unknown.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(pace).await;
    }
    Ok(())
}

/// Prints the progress bar and each replica's state; `redraw` first moves
/// back over the previous view.
fn render(seen: &Seen, done: u64, total: u64, conflicts: u64, redraw: bool) {
    let rows: Vec<String> = seen
        .lock()
        .map(|s| {
            s.iter()
                .enumerate()
                .map(|(i, r)| match r.get(TOPIC) {
                    Some((rev, data)) => {
                        format!("  replica {i}: revision {rev:<20} counter = {data}")
                    }
                    None => format!("  replica {i}: (no snapshot yet)"),
                })
                .collect()
        })
        .unwrap_or_default();
    let width = 30;
    let filled = usize::try_from(done * width / total.max(1)).unwrap_or(0);
    let bar = format!(
        "  writes [{}{}] {done}/{total}   conflicts {conflicts}",
        "#".repeat(filled),
        ".".repeat(30 - filled.min(30))
    );
    let mut out = std::io::stdout().lock();
    if redraw {
        let _ = write!(out, "\x1b[{}F\x1b[J", rows.len() + 1);
    }
    let _ = writeln!(out, "{bar}");
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    let _ = out.flush();
}

async fn start_hub(
    exe: &Path,
    dir: &Path,
    engine: &[(&str, String)],
    ws: Option<&str>,
) -> Result<Child, Box<dyn std::error::Error>> {
    let mut child = Command::new(exe)
        .args(["serve", "--log", "error", "--data-dir"])
        .arg(dir)
        .args(ws.map(|addr| ["--ws", addr]).into_iter().flatten())
        .envs(engine.iter().map(|(name, value)| (*name, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no hub stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| "the hub did not start within 10 s")??
        .ok_or("the hub exited")?;
    if !first.contains("\"listening\"") {
        return Err(format!("unexpected hub output: {first}").into());
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

fn start_replica(
    exe: &Path,
    data_dir: &Path,
    index: usize,
    seen: Seen,
    fetched: Arc<AtomicU64>,
) -> Result<Child, Box<dyn std::error::Error>> {
    let mut child = Command::new(exe)
        .args(["watch", TOPIC, "--log", "error", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no replica stdout")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(applied) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            fetched.fetch_add(1, Ordering::Relaxed);
            let topic = applied["topic"].as_str().unwrap_or_default().to_owned();
            let revision =
                Revision::from_json_value(&applied["revision"]).unwrap_or(Revision::ZERO);
            if let Ok(mut seen) = seen.lock() {
                seen[index].insert(topic, (revision, applied["data"].clone()));
            }
        }
    });
    Ok(child)
}
