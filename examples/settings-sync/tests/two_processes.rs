//! The README's example, run as it is meant to be: a replica process and a
//! writer process, through a hub on a Unix socket.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use state_sync_hub::Hub;
use state_sync_net::Server;

fn example() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settings-sync"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_one_process_reaches_the_replica_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hub.sock");
    let server = Server::new(Hub::in_memory());
    server.listen_unix(&socket).await.unwrap();

    // The replica starts first and waits for the topic.
    let mut watcher = example()
        .args(["--socket", socket.to_str().unwrap(), "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });

    let write = |args: &[&str]| {
        let out = example()
            .args(["--socket", socket.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    write(&["theme", "dark"]);
    write(&["bigger"]);

    let want = r#"Settings { theme: "dark", font_size: 15 }"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while last != want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        last = seen
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the replica never printed {want}; last: {last}"));
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    server.shutdown().await;
}
