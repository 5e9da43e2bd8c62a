//! The real `statesync` binary, in separate processes over real sockets:
//! serve/set/get/watch round trips, exit codes, a hub killed with SIGKILL
//! and restarted, and the demo. Unix: it drives the hub over Unix sockets.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use state_sync::Revision;
use state_sync::testkit::WithinLimit;
use state_sync_net::{Client, ClientOptions, Endpoint, Error as ClientError};

mod common;

use common::*;

#[test]
fn serve_set_get_and_watch_round_trip_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), &[]);
    let watcher = Watcher::start(&hub.socket, &["settings"]);

    let (code, out, err) = run(&["set", "settings", r#"{"theme":"dark"}"#], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let written: Value = serde_json::from_str(&out).unwrap();
    let revision = Revision::from_json_value(&written["revision"]).unwrap();

    let (code, out, err) = run(&["get", "settings"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        got,
        json!({"revision": revision.to_string(), "data": {"theme": "dark"}})
    );

    assert_eq!(
        watcher.wait_for("settings", revision),
        json!({"theme": "dark"})
    );

    // stdin and --file inputs.
    let mut child = statesync()
        .args(["set", "settings", "--socket"])
        .arg(&hub.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), br#"{"theme":"light"}"#).unwrap();
    drop(child.stdin.take());
    assert!(child.wait_with_output().unwrap().status.success());
    let file = dir.path().join("v.json");
    std::fs::write(&file, r#"{"theme":"solarized"}"#).unwrap();
    let (code, out, _) = run(
        &["set", "settings", "--file", file.to_str().unwrap()],
        &hub.socket,
    );
    assert_eq!(code, 0);
    let last = Revision::from_json_value(&serde_json::from_str::<Value>(&out).unwrap()["revision"])
        .unwrap();
    assert_eq!(
        watcher.wait_for("settings", last),
        json!({"theme": "solarized"})
    );
}

#[test]
fn set_and_get_over_a_named_local_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("statesync-cli-test-{}", std::process::id());
    let _hub = HubProcess::start(dir.path(), &["--local", &name]);
    let over_local = |args: &[&str]| {
        let out = statesync()
            .args(args)
            .args(["--local", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let written = over_local(&["set", "settings", r#"{"theme":"dark"}"#]);
    let got = over_local(&["get", "settings"]);
    assert_eq!(got["revision"], written["revision"]);
    assert_eq!(got["data"], json!({"theme": "dark"}));
    // One way to reach the hub at a time.
    let out = statesync()
        .args([
            "get",
            "settings",
            "--local",
            &name,
            "--url",
            "ws://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn exit_codes_for_conflicts_bad_input_and_bad_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), &["--token", "s3cret"]);
    let socket = &hub.socket;
    let with_token = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--token", "s3cret"]);
        run(&all, socket)
    };

    let (code, out, _) = with_token(&["set", "n", "1"]);
    assert_eq!(code, 0);
    let first =
        Revision::from_json_value(&serde_json::from_str::<Value>(&out).unwrap()["revision"])
            .unwrap();
    let (code, _, _) = with_token(&["set", "n", "2", "--expect", &first.to_string()]);
    assert_eq!(code, 0);
    let (code, _, err) = with_token(&["set", "n", "3", "--expect", &first.to_string()]);
    assert_eq!(code, 3, "conflict: {err}");
    assert!(err.contains("conflict"), "{err}");

    let (code, _, err) = with_token(&["set", "n", "{not json"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("invalid JSON"), "{err}");
    let (code, _, _) = with_token(&["set", "n", "1", "--expect", "01"]);
    assert_eq!(code, 2, "a non-canonical revision is a usage error");
    let (code, _, _) = with_token(&["get", "nothing-here"]);
    assert_eq!(code, 4, "unknown topic");

    let (code, _, err) = run(&["get", "n", "--token", "wrong"], socket);
    assert_eq!(code, 5, "{err}");
    let (code, _, _) = run(&["set", "n", "9"], socket);
    assert_eq!(code, 5, "no token");

    // Still serving, and nothing refused was written.
    let (code, out, _) = with_token(&["get", "n"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["data"], 2);

    let gone = dir.path().join("no.sock");
    let (code, _, err) = run(&["get", "n"], &gone);
    assert_eq!(code, 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_converge_and_survive_a_sigkilled_hub_without_losing_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(dir.path(), &[]);
    let socket = hub.socket.clone();
    let watchers: Vec<Watcher> = (0..3)
        .map(|_| Watcher::start(&socket, &["counter"]))
        .collect();

    let writer = Client::connect(Endpoint::Unix(socket.clone()), ClientOptions::new("writer"));
    writer.wait_connected().within_limit().await;
    let mut acked: Vec<(Revision, u64)> = Vec::new();
    let mut value = 0u64;
    for round in 0..2 {
        for _ in 0..100 {
            value += 1;
            loop {
                match writer.set("counter", &value, None).await {
                    Ok(revision) => {
                        acked.push((revision, value));
                        break;
                    }
                    Err(ClientError::Disconnected | ClientError::Timeout(_)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        if round == 0 {
            // Mid-stream: no shutdown, no flush. Restart on the same store.
            hub.kill();
            hub = HubProcess::start(dir.path(), &[]);
            // Everything acknowledged before the kill survived.
            let reader =
                Client::connect(Endpoint::Unix(socket.clone()), ClientOptions::new("check"));
            reader.wait_connected().within_limit().await;
            let (revision, data) = reader.get_json("counter").await.unwrap();
            assert_eq!(revision, acked.last().unwrap().0);
            assert_eq!(serde_json::from_slice::<u64>(&data).unwrap(), value);
        }
    }

    let (last_revision, last_value) = *acked.last().unwrap();
    assert_eq!(last_value, 200);
    let revisions: Vec<Revision> = acked.iter().map(|(r, _)| *r).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions went backwards"
    );
    for watcher in &watchers {
        assert_eq!(watcher.wait_for("counter", last_revision), json!(200));
        let seen = watcher.revisions("counter");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
}

#[test]
fn the_demo_runs_to_completion_and_reports_convergence() {
    let out = statesync()
        .args(["demo", "--replicas", "3", "--writes", "40"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("converged             yes"), "{stdout}");
    assert!(stdout.contains("no acknowledged update lost"), "{stdout}");
    assert!(stdout.contains("hub killed (SIGKILL)"), "{stdout}");
}

#[test]
fn every_command_has_help_with_examples() {
    for command in ["serve", "get", "set", "watch", "status", "bench", "demo"] {
        let out = statesync().args([command, "--help"]).output().unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{command}"
        );
    }
    let out = statesync().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Exit codes:"));
}

#[test]
fn a_hub_whose_stderr_and_stdout_are_gone_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::File::create("/dev/full").unwrap();
    // Every warning (a refused token) fails to reach stderr; the hub's
    // stdout reader is gone too once `start` returns.
    let hub = HubProcess::start_with(
        dir.path(),
        &["--log", "debug", "--token", "right"],
        Stdio::from(full),
    );
    for i in 0..5 {
        let (code, _, _) = run(&["get", "t", "--token", "wrong"], &hub.socket);
        assert_eq!(code, 5, "refused, and logged as a warning");
        let value = i.to_string();
        let (code, out, err) = run(&["set", "t", &value, "--token", "right"], &hub.socket);
        assert_eq!(code, 0, "set {i}: {out} {err}");
        let (code, out, _) = run(&["get", "t", "--token", "right"], &hub.socket);
        assert_eq!(code, 0);
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["data"], json!(i));
    }
}

#[test]
fn tokens_come_from_a_file_and_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "tok-5f1c2a9e-never-logged";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let log_path = dir.path().join("hub.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let data_dir = dir.path().join("data");
    let hub = HubProcess::start_with(
        &data_dir,
        &[
            "--log",
            "trace",
            "--ws",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        Stdio::from(log),
    );
    let url = hub.websocket.clone().unwrap();
    let by_file = ["--token-file", token_file.to_str().unwrap()];
    let set = statesync()
        .args(["set", "t", "1", "--url", &url])
        .args(by_file)
        .output()
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let (code, _, _) = run(
        &["get", "t", "--token-file", token_file.to_str().unwrap()],
        &hub.socket,
    );
    assert_eq!(code, 0);
    let (code, _, _) = run(&["get", "t"], &hub.socket);
    assert_eq!(code, 5, "no token: refused");
    drop(hub);
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("TRACE") || logged.contains("DEBUG"),
        "trace logging is on"
    );
    assert!(!logged.contains(secret), "the token reached the log");
}

#[test]
fn a_second_hub_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = HubProcess::start(dir.path(), &[]);
    let second = statesync()
        .args(["serve", "--log", "error", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&format!("pid {}", _first.child.id())), "{err}");
}

#[test]
fn serve_takes_every_setting_from_a_config_file_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("statesync.toml");
    std::fs::write(
        &config,
        r#"
        [listen]
        socket = "from-file.sock"
        websocket = "127.0.0.1:0"

        [access]
        token = "s3cret"

        [[access.clients]]
        name = "reader"
        token = "read-only"
        read = ["*"]

        [hub]
        max_topics = 2

        [server]
        max_snapshot_bytes = 64
        "#,
    )
    .unwrap();
    let flag_socket = dir.path().join("from-flag.sock");
    let hub = HubProcess::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--socket",
            flag_socket.to_str().unwrap(),
        ],
    );
    // `--socket` beats `[listen] socket`; the file's WebSocket listener is up.
    assert_eq!(hub.socket, flag_socket);
    assert!(!dir.path().join("from-file.sock").exists());
    assert!(hub.websocket.is_some());

    // `[access]`: no token, no entry; the full-access token writes; the
    // reader's token reads and may not write.
    let (code, _, err) = run(&["set", "a", "1"], &hub.socket);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = run(&["set", "a", "1", "--token", "s3cret"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["get", "a", "--token", "read-only"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["data"], 1);
    let (code, _, _) = run(&["set", "a", "2", "--token", "read-only"], &hub.socket);
    assert_eq!(code, 5);

    // `[server]` limits and `[hub]` settings apply.
    let big = format!("\"{}\"", "x".repeat(100));
    let (code, _, err) = run(&["set", "a", &big, "--token", "s3cret"], &hub.socket);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("too_large") || err.contains("large"), "{err}");
    let (code, _, err) = run(&["set", "b", "1", "--token", "s3cret"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["set", "c", "1", "--token", "s3cret"], &hub.socket);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("too_many_topics"), "{err}");
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("statesync.toml");
    std::fs::write(&config, "[server]\nmax_conections = 10\n").unwrap();
    let out = statesync()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("max_conections"), "{err}");
    assert!(err.contains("statesync.toml"), "{err}");
    assert!(!dir.path().join("hub.sock").exists());
}

#[test]
fn bench_runs_on_a_temporary_hub_and_on_a_running_one() {
    let bench = |extra: &[&str]| {
        let args = [
            "bench",
            "--clients",
            "5",
            "--writes",
            "10",
            "--rate",
            "200",
            "--json",
        ];
        json_of(&[&args[..], extra].concat())
    };
    let whole = bench(&["--no-deltas"]);
    assert_eq!(whole["clients"], 5);
    assert!(whole["p99_ms"].as_f64().unwrap() >= whole["p50_ms"].as_f64().unwrap());
    // Five replicas, about 1 KiB each per write, inline.
    let bytes = whole["hub_snapshot_bytes_per_write"].as_f64().unwrap();
    assert!((5.0 * 1024.0..5.0 * 1200.0).contains(&bytes), "{bytes}");
    assert_eq!(whole["deltas_per_write"], 0.0);
    // With deltas (the default) the writes' one changed field travels.
    let deltas = bench(&[]);
    let sent = deltas["deltas_per_write"].as_f64().unwrap();
    assert!((4.0..=5.0).contains(&sent), "{sent} deltas per write");
    let out = deltas["hub_bytes_out_per_write"].as_f64().unwrap();
    assert!(out < 5.0 * 1024.0 / 2.0, "{out} bytes out per write");

    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), &["--ws", "127.0.0.1:0"]);
    let (code, _, err) = run(&["set", "mine", "1"], &hub.socket);
    assert_eq!(code, 0, "{err}");
    let out = statesync()
        .args(["bench", "--clients", "3", "--writes", "5", "--rate", "200"])
        .args(["--url", hub.websocket.as_deref().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("p50") && table.contains("p99"), "{table}");
    // The hub runs in its own process here, so its CPU is its own line;
    // a temporary hub's is in the client's.
    assert!(table.contains("CPU per write: client"), "{table}");
    if cfg!(target_os = "linux") {
        assert!(!table.contains("hub n/a"), "{table}");
    }
    assert_eq!(deltas["hub_cpu_ms_per_write"], serde_json::Value::Null);
    // Its own topic; the hub's others are untouched.
    let (_, got, _) = run(&["get", "mine"], &hub.socket);
    assert!(got.contains(r#""data":1"#), "{got}");
    let (code, _, _) = run(&["get", "statesync-bench:doc"], &hub.socket);
    assert_eq!(code, 0);
}

/// The value of the sample `series` (name and labels, as printed) in a
/// Prometheus text scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[test]
fn metrics_and_health_are_served_for_a_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = statesync()
        .args([
            "serve",
            "--log",
            "warn",
            "--metrics",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let ready: Value = serde_json::from_str(&first).unwrap();
    let metrics_url = ready["metrics"].as_str().unwrap().to_owned();
    let socket = std::path::PathBuf::from(ready["socket"].as_str().unwrap());

    let (code, out, _) = run(&["set", "settings", r#"{"theme":"dark"}"#], &socket);
    assert_eq!(code, 0);
    let revision =
        Revision::from_json_value(&serde_json::from_str::<Value>(&out).unwrap()["revision"])
            .unwrap();
    let watcher = Watcher::start(&socket, &["settings"]);
    watcher.wait_for("settings", revision);
    let (code, _, _) = run(&["get", "missing"], &socket);
    assert_eq!(code, 4);
    let (code, _, _) = run(&["set", "settings", r#"{"theme":"light"}"#], &socket);
    assert_eq!(code, 0);

    let scrape = ureq::get(&metrics_url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let at_least = |series: &str, min: f64| {
        let value = sample(&scrape, series).unwrap_or_else(|| panic!("no {series} in\n{scrape}"));
        assert!(value >= min, "{series} = {value}, expected at least {min}");
    };
    at_least(r#"statesync_connections{transport="unix"}"#, 1.0);
    at_least(r#"statesync_subscriptions{transport="unix"}"#, 1.0);
    at_least(
        r#"statesync_connections_opened_total{transport="unix"}"#,
        4.0,
    );
    at_least(
        r#"statesync_request_duration_seconds_count{type="set"}"#,
        2.0,
    );
    at_least(
        r#"statesync_request_duration_seconds_count{type="subscribe"}"#,
        1.0,
    );
    at_least(r#"statesync_errors_total{code="unknown_topic"}"#, 1.0);
    at_least("statesync_store_commit_duration_seconds_count", 2.0);
    at_least("statesync_store_commits_total", 2.0);
    at_least("statesync_invalidations_sent_total", 1.0);
    at_least(r#"statesync_bytes_out_total{transport="unix"}"#, 100.0);
    at_least("statesync_writes_total", 2.0);
    assert_eq!(sample(&scrape, "statesync_topics"), Some(1.0));
    assert_eq!(sample(&scrape, "statesync_storage_up"), Some(1.0));
    assert!(scrape.contains(r#"statesync_request_duration_seconds_bucket{type="set",le="0.005"}"#));
    // The watcher is a replica built with the engine: its counters too.
    let health_url = metrics_url.replace("/metrics", "/healthz");
    let health: Value = serde_json::from_str(
        &ureq::get(&health_url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(health["status"], "ok");
    drop(watcher);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn debug_logs_carry_the_connection_and_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hub.log");
    let hub = HubProcess::start_with(
        dir.path(),
        &["--log", "state_sync_net=debug"],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let (code, _, _) = run(&["set", "traced", "1"], &hub.socket);
    assert_eq!(code, 0);
    drop(hub);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("answered") && line.contains("kind=\"set\""))
        .unwrap_or_else(|| panic!("no answered set in\n{text}"));
    for part in [
        "connection{",
        "transport=\"unix\"",
        "client=statesync-set",
        "request{",
        "topic=\"traced\"",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}
