//! Crash safety for real: a child process stores records in a loop and is
//! killed with SIGKILL at random moments; after each kill the store must
//! open with a valid record at least as new as the last one the child
//! reported as committed.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use state_sync::{Revision, Topic};
use state_sync_storage::{FileStorage, Record, Storage};

const CHILD_ENV: &str = "STATE_SYNC_CRASH_CHILD_DIR";
const KILLS: usize = 50;

fn topic() -> Topic {
    Topic::new("crash:test").unwrap()
}

/// The child's side: runs only when spawned by the parent test.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let storage = FileStorage::open(&dir).unwrap();
    let start = storage
        .load(&topic())
        .await
        .unwrap()
        .map_or(0, |r| r.revision.get());
    for revision in start + 1.. {
        // Variable sizes so a torn write would show as a length or CRC error.
        let data = format!(
            "{{\"n\":{revision},\"pad\":\"{}\"}}",
            "x".repeat((revision % 97) as usize * 40)
        );
        storage
            .store(&topic(), &Record::new(Revision::new(revision), data))
            .await
            .unwrap();
        println!("committed {revision}");
    }
}

#[tokio::test]
async fn sigkill_at_random_moments_never_loses_a_committed_record() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut last_committed = 0u64;
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let deadline = Instant::now() + Duration::from_millis(rng.u64(5..60));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("committed ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Wait for at least one commit, then kill at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child commits");
        last_committed = last_committed.max(first);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            last_committed = last_committed.max(n);
        }

        let storage = FileStorage::open(dir.path()).unwrap();
        let record = storage
            .load(&topic())
            .await
            .unwrap_or_else(|e| panic!("kill {kill}: store does not open: {e}"))
            .unwrap_or_else(|| panic!("kill {kill}: record missing"));
        assert!(
            record.revision.get() >= last_committed,
            "kill {kill}: found revision {} but {last_committed} was reported committed",
            record.revision
        );
        let text = std::str::from_utf8(&record.data).unwrap();
        assert!(
            text.starts_with(&format!("{{\"n\":{},", record.revision)),
            "kill {kill}: data matches its revision"
        );
    }
    assert!(last_committed >= KILLS as u64);
}
