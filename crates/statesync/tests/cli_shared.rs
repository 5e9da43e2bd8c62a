//! Three `statesync serve --redis` (or `--postgres`) processes on one real
//! server, `statesync watch` replicas on each: they behave as one hub, also
//! when one of them is killed with SIGKILL.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use state_sync::Revision;
use state_sync::testkit::WithinLimit;
use state_sync_net::{Client, ClientOptions, Endpoint, Error as ClientError};
use state_sync_postgres::testkit::PostgresServer;
use state_sync_redis::testkit::RedisServer;

fn hubs(engine: &[&str], dirs: &[tempfile::TempDir]) -> Vec<HubProcess> {
    dirs.iter()
        .map(|dir| HubProcess::start(dir.path(), engine))
        .collect()
}

/// Compare-and-set increments of `counter` through `client` until `count`
/// of them won; returns the revisions won, and how many sets had an
/// unknown outcome (the hub was killed before answering: they may have
/// been committed).
async fn increments(client: Client, count: usize) -> (Vec<Revision>, u64) {
    let mut won = Vec::new();
    let mut unknown = 0;
    while won.len() < count {
        let current = match client.get_json("counter").await {
            Ok((revision, data)) => (revision, serde_json::from_slice::<u64>(&data).unwrap()),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        match client
            .set("counter", &(current.1 + 1), Some(current.0))
            .await
        {
            Ok(revision) => won.push(revision),
            Err(ClientError::Conflict { .. }) => {}
            // The hub was killed: wait for it to come back.
            Err(_) => {
                unknown += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (won, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_on_redis_behave_as_one_and_survive_a_sigkilled_hub() {
    let redis = RedisServer::start();
    three_hubs_behave_as_one(&["--redis", &redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_on_postgres_behave_as_one_and_survive_a_sigkilled_hub() {
    let postgres = PostgresServer::start();
    // The engine from the config file's `[store]`, as an operator writes it.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("statesync.toml");
    let store = toml::toml! { [store] postgres = (postgres.config()) };
    std::fs::write(&config, store.to_string()).unwrap();
    three_hubs_behave_as_one(&["--config", config.to_str().unwrap()]).await;
}

async fn three_hubs_behave_as_one(engine: &[&str]) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hubs = hubs(engine, &dirs);
    let (code, _, err) = run(&["set", "counter", "0"], &hubs[0].socket);
    assert_eq!(code, 0, "{err}");
    let watchers: Vec<_> = hubs
        .iter()
        .map(|hub| Watcher::start(&hub.socket, &["counter"]))
        .collect();

    // 6 writers over the 3 hubs, 40 compare-and-set increments each; hub 1
    // is killed halfway and restarted on its socket.
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let socket = hubs[i % 3].socket.clone();
            let options = ClientOptions::new(format!("writer-{i}"));
            let client = Client::connect(Endpoint::Unix(socket), options);
            tokio::spawn(increments(client, 40))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hubs[1].kill();
    hubs[1] = HubProcess::start(dirs[1].path(), engine);

    let mut issued = std::collections::HashSet::new();
    let mut unknown = 0;
    for writer in writers {
        let (won, lost_answers) = writer.within_limit().await.unwrap();
        unknown += lost_answers;
        for revision in won {
            assert!(issued.insert(revision), "revision {revision} issued twice");
        }
    }
    assert_eq!(issued.len(), 240);
    // Every acknowledged increment is in; a set whose answer was lost with
    // the killed hub may be in too.
    let (code, out, _) = run(&["get", "counter"], &hubs[0].socket);
    assert_eq!(code, 0);
    let settled: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total = settled["data"].as_u64().unwrap();
    assert!(
        (240..=240 + unknown).contains(&total),
        "{total} with {unknown} unknown outcomes"
    );
    let last: Revision = settled["revision"].as_str().unwrap().parse().unwrap();
    assert!(last >= *issued.iter().max().unwrap());
    for watcher in &watchers {
        assert_eq!(watcher.wait_for("counter", last), json!(total));
        let seen = watcher.revisions("counter");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
    // Every hub answers the same.
    for hub in &hubs {
        let (code, out, _) = run(&["get", "counter"], &hub.socket);
        assert_eq!(code, 0);
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["data"], json!(total));
        assert_eq!(got["revision"], last.to_string());
    }
}

/// `statesync demo` on an engine: three hubs, one killed, every replica
/// converged, no acknowledged update lost.
fn demo_on(variable: &str, value: &str) {
    let out = statesync()
        .args([
            "demo",
            "--replicas",
            "3",
            "--writes",
            "30",
            "--pace-ms",
            "5",
        ])
        .env(variable, value)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 hubs sharing"), "{stdout}");
    assert!(stdout.contains("hub killed (SIGKILL)"), "{stdout}");
    assert!(stdout.contains("no acknowledged update lost"), "{stdout}");
    assert!(stdout.contains("converged             yes"), "{stdout}");
}

#[test]
fn the_demo_runs_on_redis() {
    let redis = RedisServer::start();
    demo_on("STATESYNC_REDIS_URL", &redis.url());
}

#[test]
fn the_demo_runs_on_postgres() {
    let postgres = PostgresServer::start();
    demo_on("STATESYNC_POSTGRES_URL", &postgres.config());
}

fn status_of(hub: &HubProcess) -> serde_json::Value {
    let (code, out, err) = run(&["status", "--json"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn while_redis_is_down_status_marks_the_hub_stale_and_reads_keep_serving() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), &["--redis", &redis.url()]);
    let (code, _, err) = run(&["set", "settings", r#"{"v":1}"#], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let status = status_of(&hub);
    assert_eq!(status["sharedStorage"], true);
    assert_eq!(status["stale"], false);
    assert_eq!(status["topics"][0]["topic"], "settings");

    redis.stop();
    let (code, _, err) = run(&["set", "settings", r#"{"v":2}"#], &hub.socket);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("storage"), "{err}");
    let (code, out, _) = run(&["get", "settings"], &hub.socket);
    assert_eq!(code, 0);
    assert!(out.contains(r#""data":{"v":1}"#), "{out}");
    let status = status_of(&hub);
    assert_eq!(status["stale"], true, "{status}");
    assert!(status["stats"]["storageFailure"].is_string(), "{status}");
    let (code, table, _) = run(&["status"], &hub.socket);
    assert_eq!(code, 0);
    assert!(table.contains("FAILING, reads may be stale"), "{table}");

    // Back: the next write succeeds and clears the mark.
    redis.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while run(&["set", "settings", r#"{"v":3}"#], &hub.socket).0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status_of(&hub)["stale"], false);
}

#[test]
fn bench_compares_the_hub_with_a_redis_baseline_in_the_same_run() {
    let result = json_of(&[
        "bench",
        "--clients",
        "4",
        "--writes",
        "10",
        "--rate",
        "200",
        "--baseline",
        "redis",
        "--json",
    ]);
    assert_eq!(result["redis"]["clients"], 4);
    assert!(
        result["redis"]["p99_ms"].as_f64().unwrap() > 0.0,
        "{result}"
    );
    assert!(
        result["redis"]["redis_bytes_out_per_write"]
            .as_f64()
            .unwrap()
            > 4.0 * 1024.0
    );
    assert!(result["hub"]["p99_ms"].as_f64().is_some());
    assert!(
        result["hub_over_redis"]["p99"].as_f64().is_some(),
        "{result}"
    );
}

#[test]
fn bench_measures_the_floor_of_plain_sockets_of_the_hubs_kind() {
    for (transport, floor) in [("unix", "unix"), ("websocket", "tcp")] {
        let result = json_of(&[
            "bench",
            "--clients",
            "5",
            "--writes",
            "10",
            "--rate",
            "200",
            "--transport",
            transport,
            "--baseline",
            "sockets",
            "--json",
        ]);
        let sockets = &result["sockets"];
        assert_eq!(sockets["transport"], floor, "{result}");
        assert_eq!(sockets["clients"], 5);
        assert_eq!(sockets["writes"], 10);
        // As many bytes per replica as the hub sent.
        let hub_bytes = result["hub"]["hub_bytes_out_per_write"].as_f64().unwrap();
        assert_eq!(
            sockets["frame_bytes"].as_f64().unwrap(),
            (hub_bytes / 5.0).round(),
            "{result}"
        );
        assert!(sockets["p99_ms"].as_f64().unwrap() > 0.0, "{result}");
        assert!(sockets["cpu_ms_per_write"].as_f64().is_some(), "{result}");
        assert!(
            result["hub_over_sockets"]["p99"].as_f64().is_some(),
            "{result}"
        );
        assert!(result.get("redis").is_none(), "{result}");
    }
    // As a table, below the hub's.
    let out = statesync()
        .args(["bench", "--clients", "3", "--writes", "5", "--rate", "200"])
        .args(["--baseline", "sockets"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("statesync bench: 3 replicas"), "{table}");
    assert!(
        table.contains("plain unix sockets (the floor), 3 connections"),
        "{table}"
    );
    assert!(table.contains("hub over the floor: p50 "), "{table}");
}
