//! Helpers shared by the tests of the real `statesync` binary: hub and
//! watcher processes, one-shot commands.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;
use state_sync::Revision;

pub fn statesync() -> Command {
    Command::cargo_bin("statesync").unwrap()
}

/// Runs `statesync ARGS`, which must succeed, and reads its stdout as JSON.
pub fn json_of(args: &[&str]) -> Value {
    let out = statesync().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `statesync serve` process; killed on drop.
pub struct HubProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub websocket: Option<String>,
}

impl HubProcess {
    pub fn start(data_dir: &Path, extra: &[&str]) -> HubProcess {
        HubProcess::start_with(data_dir, extra, Stdio::inherit())
    }

    /// Starts a hub logging to `stderr`.
    pub fn start_with(data_dir: &Path, extra: &[&str], stderr: Stdio) -> HubProcess {
        let log = if extra.contains(&"--log") {
            &[][..]
        } else {
            &["--log", "warn"][..]
        };
        let mut child = statesync()
            .arg("serve")
            .args(log)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let ready: Value =
            serde_json::from_str(&first).unwrap_or_else(|_| panic!("hub said {first:?}"));
        assert_eq!(ready["event"], "listening");
        HubProcess {
            child,
            socket: PathBuf::from(ready["socket"].as_str().unwrap()),
            websocket: ready["websocket"]
                .as_str()
                .map(|addr| format!("ws://{addr}")),
        }
    }

    pub fn kill(&mut self) {
        // std's kill is SIGKILL on Unix: no shutdown, no flush.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `statesync watch` process and the lines it printed.
pub struct Watcher {
    child: Child,
    applied: Arc<Mutex<Vec<Value>>>,
}

impl Watcher {
    pub fn start(socket: &Path, topics: &[&str]) -> Watcher {
        let mut child = statesync()
            .arg("watch")
            .args(topics)
            .args(["--log", "error", "--socket"])
            .arg(socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let lines = applied.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Watcher { child, applied }
    }

    /// Waits (up to 30 s) until the last line for `topic` is at `revision`;
    /// returns its data.
    pub fn wait_for(&self, topic: &str, revision: Revision) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self
                .applied
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|l| l["topic"] == topic)
                .cloned();
            if let Some(last) = &last
                && Revision::from_json_value(&last["revision"]).unwrap() == revision
            {
                return last["data"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "watcher stuck at {last:?}, want {revision}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Revisions it applied for `topic`, in order.
    pub fn revisions(&self, topic: &str) -> Vec<Revision> {
        self.applied
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["topic"] == topic)
            .map(|l| Revision::from_json_value(&l["revision"]).unwrap())
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(args: &[&str], socket: &Path) -> (i32, String, String) {
    let out = statesync()
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}
