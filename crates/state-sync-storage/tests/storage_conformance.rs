//! Every backend passes the shared conformance suite; the file backend's
//! crash-safety paths (corrupt, truncated, garbage files, a crash between
//! renames) are exercised on real files.
#![allow(clippy::unwrap_used)]

use state_sync::{Revision, Topic};
use state_sync_storage::{
    Durability, Error, FileStorage, MemoryStorage, Record, Storage, conformance,
};

#[tokio::test]
async fn memory_storage_conforms() {
    let shared = MemoryStorage::new();
    conformance::run(|| shared.clone()).await;
}

#[tokio::test]
async fn file_storage_conforms_in_both_durability_modes() {
    for durability in [Durability::Fsync, Durability::NoFsync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        conformance::run(|| FileStorage::open(&path).unwrap().durability(durability)).await;
    }
}

async fn stored(dir: &std::path::Path) -> (FileStorage, Topic, std::path::PathBuf) {
    let storage = FileStorage::open(dir).unwrap();
    let topic = Topic::new("settings").unwrap();
    storage
        .store(&topic, &Record::new(Revision::new(1), &b"{\"v\":1}"[..]))
        .await
        .unwrap();
    storage
        .store(&topic, &Record::new(Revision::new(2), &b"{\"v\":2}"[..]))
        .await
        .unwrap();
    let path = storage.path_of(&topic);
    (storage, topic, path)
}

#[tokio::test]
async fn damaged_files_are_quarantined_with_a_clear_error_and_nothing_is_overwritten() {
    type Damage = fn(&[u8]) -> Vec<u8>;
    let damages: [(&str, Damage); 4] = [
        ("truncated", |b| b[..b.len() - 3].to_vec()),
        ("empty", |_| Vec::new()),
        ("garbage", |b| vec![0u8; b.len()]),
        ("bit flip", |b| {
            let mut v = b.to_vec();
            let last = v.len() - 1;
            v[last] ^= 0x20;
            v
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let (storage, topic, path) = stored(dir.path()).await;
        let original = std::fs::read(&path).unwrap();
        let damaged = damage(&original);
        std::fs::write(&path, &damaged).unwrap();

        let err = storage.load(&topic).await.unwrap_err();
        let Error::Corrupt {
            quarantined,
            backup,
            claimed_revision,
            ..
        } = &err
        else {
            panic!("{what}: expected Corrupt, got {err:?}");
        };
        if what == "bit flip" {
            assert_eq!(
                *claimed_revision,
                Some(Revision::new(2)),
                "header still readable"
            );
        }
        if what == "garbage" || what == "empty" {
            assert_eq!(*claimed_revision, None);
        }
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("corrupt"), "{what}: {err}");
        assert!(!path.exists(), "{what}: moved aside");
        assert_eq!(
            std::fs::read(quarantined).unwrap(),
            damaged,
            "{what}: bytes kept as they were"
        );
        let backup = backup.as_ref().unwrap();
        let previous = std::fs::read(backup).unwrap();
        assert!(
            String::from_utf8_lossy(&previous).contains("{\"v\":1}"),
            "{what}: last good copy kept"
        );
    }
}

#[tokio::test]
async fn after_a_quarantine_load_returns_the_backup_and_with_no_good_copy_the_topic_stays_damaged()
{
    let dir = tempfile::tempdir().unwrap();
    let (storage, topic, path) = stored(dir.path()).await;
    std::fs::write(&path, b"SSR1 00000000 2 3\nbad").unwrap();
    assert!(matches!(
        storage.load(&topic).await,
        Err(Error::Corrupt {
            backup: Some(_),
            ..
        })
    ));
    let fallback = storage.load(&topic).await.unwrap().unwrap();
    assert_eq!(fallback.revision, Revision::new(1), "the last good copy");

    // Damage the backup too: no good copy is left.
    let mut backup = path.clone().into_os_string();
    backup.push(".bak");
    std::fs::write(&backup, b"garbage").unwrap();
    assert!(matches!(
        storage.load(&topic).await,
        Err(Error::Corrupt { backup: None, .. })
    ));
    // Still damaged on every later load (and across restarts), never
    // silently an empty topic; still listed.
    for _ in 0..2 {
        let err = storage.load(&topic).await.unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { backup: None, .. }),
            "{err:?}"
        );
    }
    let reopened = FileStorage::open(dir.path()).unwrap();
    assert!(reopened.load(&topic).await.is_err());
    assert_eq!(reopened.topics().await.unwrap(), [topic]);
}

#[tokio::test]
async fn a_crash_between_the_renames_falls_back_to_the_last_good_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, topic, path) = stored(dir.path()).await;
    // What a crash after "current → .bak" and before ".tmp → current" leaves.
    let mut backup = path.clone().into_os_string();
    backup.push(".bak");
    std::fs::rename(&path, &backup).unwrap();
    // The interrupted store never returned, so the committed record is the
    // one that was current before it.
    let record = storage.load(&topic).await.unwrap().unwrap();
    assert_eq!(record.revision, Revision::new(2));
    assert_eq!(storage.topics().await.unwrap(), [topic]);
}

#[tokio::test]
async fn a_leftover_temp_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, topic, path) = stored(dir.path()).await;
    let mut tmp = path.into_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, b"half-written").unwrap();
    assert_eq!(
        storage.load(&topic).await.unwrap().unwrap().revision,
        Revision::new(2)
    );
    assert_eq!(storage.topics().await.unwrap(), [topic]);
}

#[tokio::test]
async fn the_shared_memory_storage_conforms_as_a_shared_storage() {
    let shared = state_sync_storage::conformance::SharedMemory::new();
    conformance::run(|| shared.clone()).await;
    conformance::run_shared(|| shared.clone()).await;
}
