//! The client-side cache: cold start, migrations, TTL, integrity,
//! compression, save timing (paused clock), events, dispose.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{MemorySource, Revision, SnapshotEnvelope, SyncHandle, Topic};
use state_sync_cache::{CacheEvent, Compression, Error, SnapshotCache};
use state_sync_storage::conformance::FaultyStorage;
use state_sync_storage::{FileStorage, MemoryStorage, Record, Storage};

fn topic() -> Topic {
    Topic::new("settings").unwrap()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    #[serde(default)]
    font_size: u32,
}

fn settings(theme: &str) -> Settings {
    Settings {
        theme: theme.into(),
        font_size: 12,
    }
}

fn events() -> (
    Arc<Mutex<Vec<CacheEvent>>>,
    impl Fn(&CacheEvent) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    (seen, move |e: &CacheEvent| {
        log.lock().unwrap().push(e.clone())
    })
}

/// One replica run: restore from the cache, sync with `source`, follow it
/// to its current revision, flush.
async fn replica_run(
    storage: &FileStorage,
    source: &MemorySource<Settings>,
) -> (Recorder<Settings>, Option<Revision>) {
    let recorder = Recorder::with_data();
    let cache = SnapshotCache::builder(topic(), storage.clone()).build();
    let cached = cache.restore(&recorder).await.unwrap();
    let mut builder = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        cache.wrap(recorder.clone()),
    );
    if let Some(revision) = cached {
        builder = builder.initial_revision(revision);
    }
    let handle = builder.build();
    handle.start().await.unwrap();
    handle
        .wait_for_revision(source.revision())
        .within_limit()
        .await
        .unwrap();
    handle.stop().await;
    cache.flush().await.unwrap();
    (recorder, cached)
}

#[tokio::test]
async fn cold_start_applies_the_cache_then_the_fresh_snapshot_only_if_newer() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    let source = MemorySource::new(topic(), settings("light"));
    source.publish(settings("dark"));

    // First run: nothing cached; the fetched snapshot is saved.
    let (first, cached) = replica_run(&storage, &source).await;
    assert_eq!(cached, None);
    assert_eq!(first.revisions(), [Revision::new(1)]);

    // Second run, source unchanged: the cached state is applied before any
    // fetch, and the (not modified) fetch applies nothing more.
    let (second, cached) = replica_run(&storage, &source).await;
    assert_eq!(cached, Some(Revision::new(1)));
    assert_eq!(second.revisions(), [Revision::new(1)]);
    assert_eq!(second.last_data(), Some(settings("dark")));

    // Third run, source moved on: cached first, then the newer snapshot.
    source.publish(settings("solarized"));
    let (third, _) = replica_run(&storage, &source).await;
    assert_eq!(third.revisions(), [Revision::new(1), Revision::new(2)]);
    assert_eq!(third.last_data(), Some(settings("solarized")));
    assert!(third.is_strictly_increasing());
}

/// Writes `value` as schema `version` through a cache of that version.
async fn cached_at(storage: &MemoryStorage, version: u32, value: serde_json::Value) {
    let cache = SnapshotCache::<serde_json::Value>::builder(topic(), storage.clone())
        .schema_version(version)
        .build();
    cache.stage(SnapshotEnvelope::new(Revision::new(7), value));
    cache.flush().await.unwrap();
}

#[tokio::test]
async fn migrations_chain_step_by_step() {
    let storage = MemoryStorage::new();
    cached_at(&storage, 1, json!({"colour": "dark"})).await;
    let (seen, on_event) = events();
    let cache = SnapshotCache::<Settings>::builder(topic(), storage.clone())
        .schema_version(3)
        .migration(1, |mut v| {
            // v2 renamed `colour` to `theme`.
            let colour = v["colour"].take();
            Ok::<_, &str>(json!({ "theme": colour }))
        })
        .migration(2, |mut v| {
            v["font_size"] = json!(14);
            Ok::<_, &str>(v)
        })
        .on_event(on_event)
        .build();
    let loaded = cache.load().await.unwrap().unwrap();
    assert_eq!(loaded.revision, Revision::new(7));
    assert_eq!(
        loaded.data,
        Settings {
            theme: "dark".into(),
            font_size: 14
        }
    );
    assert!(
        seen.lock()
            .unwrap()
            .contains(&CacheEvent::Migrated { from: 1, to: 3 })
    );
}

#[tokio::test]
async fn bad_versions_and_values_are_clear_errors_and_touch_nothing() {
    let storage = MemoryStorage::new();
    cached_at(&storage, 1, json!({"theme": "dark"})).await;
    let stored = storage.load(&topic()).await.unwrap();
    let at = |version: u32| {
        SnapshotCache::<Settings>::builder(topic(), storage.clone()).schema_version(version)
    };

    let missing = at(3).migration(2, Ok::<_, &str>).build().load().await;
    assert!(
        matches!(missing, Err(Error::MissingMigration { from: 1 })),
        "{missing:?}"
    );

    let failing = at(2)
        .migration(1, |_| Err("cannot migrate"))
        .build()
        .load()
        .await;
    assert!(
        matches!(failing, Err(Error::MigrationFailed { from: 1, .. })),
        "{failing:?}"
    );

    let refused = at(1)
        .validate(|s: &Settings| {
            if s.theme == "dark" {
                Err("dark is banned")
            } else {
                Ok(())
            }
        })
        .build()
        .load()
        .await;
    assert!(matches!(refused, Err(Error::Validation(_))), "{refused:?}");

    cached_at(&storage, 5, json!({"theme": "future"})).await;
    let stored = storage.load(&topic()).await.unwrap().or(stored);
    let future = at(3).build().load().await;
    assert!(
        matches!(
            future,
            Err(Error::FutureVersion {
                stored: 5,
                current: 3
            })
        ),
        "{future:?}"
    );
    let wrong_shape = SnapshotCache::<Vec<u8>>::builder(topic(), storage.clone())
        .schema_version(5)
        .build()
        .load()
        .await;
    assert!(
        matches!(wrong_shape, Err(Error::Invalid(_))),
        "{wrong_shape:?}"
    );
    assert_eq!(
        storage.load(&topic()).await.unwrap(),
        stored,
        "a failed load changed the record"
    );
}

#[tokio::test]
async fn corrupt_records_are_reported_not_replaced() {
    let storage = MemoryStorage::new();
    cached_at(&storage, 1, json!({"theme": "dark", "font_size": 1})).await;
    let mut record = storage.load(&topic()).await.unwrap().unwrap();
    let mut bytes = record.data.to_vec();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    record.data = bytes.into();
    storage.store(&topic(), &record).await.unwrap();

    let cache = SnapshotCache::<Settings>::builder(topic(), storage.clone()).build();
    let error = cache.load().await.unwrap_err();
    assert!(
        matches!(&error, Error::Corrupt { reason } if reason.contains("checksum")),
        "{error}"
    );
    assert_eq!(storage.load(&topic()).await.unwrap(), Some(record));

    storage
        .store(
            &topic(),
            &Record::new(Revision::new(1), &b"{\"theme\":\"x\"}"[..]),
        )
        .await
        .unwrap();
    assert!(matches!(cache.load().await, Err(Error::Corrupt { .. })));
}

#[tokio::test]
async fn expired_snapshots_are_removed_not_applied() {
    let storage = MemoryStorage::new();
    let now = Arc::new(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
    ));
    let clock = {
        let now = now.clone();
        move || *now.lock().unwrap()
    };
    let (seen, on_event) = events();
    let cache = SnapshotCache::<Settings>::builder(topic(), storage.clone())
        .ttl(Duration::from_secs(3600))
        .clock(clock)
        .on_event(on_event)
        .build();
    cache.stage(SnapshotEnvelope::new(Revision::new(3), settings("dark")));
    cache.flush().await.unwrap();

    *now.lock().unwrap() += Duration::from_secs(3599);
    assert!(cache.load().await.unwrap().is_some(), "expired too early");
    *now.lock().unwrap() += Duration::from_secs(2);
    assert_eq!(cache.load().await.unwrap(), None);
    assert_eq!(
        storage.load(&topic()).await.unwrap(),
        None,
        "expired record kept"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&CacheEvent::Expired {
        revision: Revision::new(3),
        age: Duration::from_secs(3601)
    }));
    assert!(seen.contains(&CacheEvent::Cleared));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn zstd_round_trips_any_unicode_string(text in any::<String>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let storage = MemoryStorage::new();
            let cache = SnapshotCache::<String>::builder(topic(), storage.clone())
                .compression(Compression::Zstd { level: 3 })
                .build();
            cache.stage(SnapshotEnvelope::new(Revision::new(1), text.clone()));
            cache.flush().await.unwrap();
            let stored = storage.load(&topic()).await.unwrap().unwrap();
            let header_end = stored.data.iter().position(|b| *b == b'\n').unwrap();
            prop_assert!(std::str::from_utf8(&stored.data[..header_end]).unwrap().contains(r#""codec":"zstd""#));
            let loaded = cache.load().await.unwrap().unwrap();
            prop_assert_eq!(loaded.data, text);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn compression_shrinks_what_is_stored() {
    let storage = MemoryStorage::new();
    let cache = SnapshotCache::<Vec<String>>::builder(topic(), storage.clone())
        .compression(Compression::Zstd { level: 3 })
        .build();
    cache.stage(SnapshotEnvelope::new(
        Revision::new(1),
        vec!["a repeated line of text".into(); 500],
    ));
    cache.flush().await.unwrap();
    let stats = cache.stats();
    assert!(
        stats.last_stored_bytes * 10 < stats.last_json_bytes,
        "{stats:?}"
    );
    assert_eq!(
        storage.load(&topic()).await.unwrap().unwrap().data.len(),
        stats.last_stored_bytes
    );
}

fn staged(cache: &SnapshotCache<u64>, revision: u64) {
    cache.stage(SnapshotEnvelope::new(Revision::new(revision), revision));
}

async fn saved(storage: &MemoryStorage) -> Option<Revision> {
    storage.load(&topic()).await.unwrap().map(|r| r.revision)
}

async fn advance(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn debounce_saves_once_after_the_last_change() {
    let storage = MemoryStorage::new();
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone())
        .debounce(Duration::from_millis(100))
        .build();
    for r in 1..=5 {
        staged(&cache, r);
        advance(30).await;
    }
    assert_eq!(saved(&storage).await, None, "saved during the burst");
    advance(69).await;
    assert_eq!(saved(&storage).await, None);
    advance(2).await;
    assert_eq!(saved(&storage).await, Some(Revision::new(5)));
    let stats = cache.stats();
    assert_eq!((stats.saves, stats.staged, stats.coalesced), (1, 5, 4));
}

#[tokio::test(start_paused = true)]
async fn throttle_saves_at_once_then_at_most_once_per_interval() {
    let storage = MemoryStorage::new();
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone())
        .throttle(Duration::from_millis(100))
        .build();
    staged(&cache, 1);
    advance(1).await;
    assert_eq!(
        saved(&storage).await,
        Some(Revision::new(1)),
        "no leading save"
    );
    staged(&cache, 2);
    advance(10).await;
    staged(&cache, 3);
    advance(80).await;
    assert_eq!(
        saved(&storage).await,
        Some(Revision::new(1)),
        "saved inside the window"
    );
    advance(15).await;
    assert_eq!(saved(&storage).await, Some(Revision::new(3)));
    assert_eq!(cache.stats().saves, 2);
}

#[tokio::test(start_paused = true)]
async fn max_wait_bounds_how_long_debounce_can_postpone() {
    let storage = MemoryStorage::new();
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone())
        .debounce(Duration::from_millis(100))
        .max_wait(Duration::from_millis(250))
        .build();
    // A change every 50 ms would postpone a plain debounce forever.
    for r in 1..=20 {
        staged(&cache, r);
        advance(50).await;
    }
    // Saves near 250, 500, 750, 1000 ms.
    let saves = cache.stats().saves;
    assert!((3..=4).contains(&saves), "{saves} saves in 1 s");
    advance(200).await;
    assert_eq!(saved(&storage).await, Some(Revision::new(20)));
}

#[tokio::test(start_paused = true)]
async fn flush_saves_now_and_dispose_stops_saving() {
    let storage = MemoryStorage::new();
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone())
        .debounce(Duration::from_secs(60))
        .build();
    staged(&cache, 1);
    cache.flush().await.unwrap();
    assert_eq!(saved(&storage).await, Some(Revision::new(1)));

    staged(&cache, 2);
    cache.dispose().await.unwrap();
    assert_eq!(
        saved(&storage).await,
        Some(Revision::new(2)),
        "dispose did not flush"
    );
    staged(&cache, 3);
    advance(120_000).await;
    assert_eq!(
        saved(&storage).await,
        Some(Revision::new(2)),
        "saved after dispose"
    );
    assert!(matches!(cache.flush().await, Err(Error::Disposed)));
}

#[tokio::test]
async fn every_declared_event_fires() {
    let storage = FaultyStorage::new();
    let (seen, on_event) = events();
    let old = cached_at(storage.records(), 1, json!({"theme": "dark"}));
    old.await;
    let now = Arc::new(Mutex::new(SystemTime::now()));
    let clock = {
        let now = now.clone();
        move || *now.lock().unwrap()
    };
    let cache = SnapshotCache::<Settings>::builder(topic(), storage.clone())
        .schema_version(2)
        .migration(1, Ok::<_, &str>)
        .ttl(Duration::from_secs(60))
        .clock(clock)
        .on_event(on_event)
        .build();

    cache.load().await.unwrap().unwrap(); // migrated, load completed
    storage.fail_stores(true);
    cache.stage(SnapshotEnvelope::new(Revision::new(8), settings("a")));
    assert!(cache.flush().await.is_err()); // save started, save failed
    storage.fail_stores(false);
    cache.flush().await.unwrap(); // the failed snapshot is saved on retry
    assert_eq!(cache.stats().last_saved_revision, Some(Revision::new(8)));
    *now.lock().unwrap() += Duration::from_secs(61);
    assert_eq!(cache.load().await.unwrap(), None); // expired, cleared

    let kinds: std::collections::BTreeSet<&str> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            CacheEvent::SaveStarted { .. } => "save_started",
            CacheEvent::SaveCompleted { .. } => "save_completed",
            CacheEvent::SaveFailed { .. } => "save_failed",
            CacheEvent::LoadCompleted { .. } => "load_completed",
            CacheEvent::Expired { .. } => "expired",
            CacheEvent::Migrated { .. } => "migrated",
            CacheEvent::Cleared => "cleared",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "cleared",
            "expired",
            "load_completed",
            "migrated",
            "save_completed",
            "save_failed",
            "save_started"
        ]
    );
    let stats = cache.stats();
    assert_eq!((stats.saves, stats.save_failures, stats.loads), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_failing_save_backs_off_instead_of_retrying_in_a_tight_loop() {
    let storage = FaultyStorage::new();
    storage.fail_stores(true);
    let (seen, on_event) = events();
    let on_event = Arc::new(on_event);
    for debounce in [None, Some(Duration::from_millis(20))] {
        let on_event = on_event.clone();
        let mut builder = SnapshotCache::<u64>::builder(topic(), storage.clone())
            .on_event(move |e: &CacheEvent| on_event(e));
        if let Some(debounce) = debounce {
            builder = builder.debounce(debounce);
        }
        let cache = builder.build();
        let before = storage.stores_started();
        staged(&cache, 1);
        advance(300).await;
        let attempts = storage.stores_started() - before;
        // At once, then after ~100 and ~200 ms of backoff (with jitter).
        assert!(
            (1..=4).contains(&attempts),
            "{attempts} store attempts in 300 ms (debounce {debounce:?})"
        );
        // It keeps trying, further apart, and succeeds once storage works.
        storage.fail_stores(false);
        advance(1_000).await;
        assert_eq!(saved(storage.records()).await, Some(Revision::new(1)));
        storage.fail_stores(true);
        drop(cache);
    }
    let failed = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, CacheEvent::SaveFailed { .. }))
        .count();
    assert!(failed <= 8, "{failed} SaveFailed events");
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_staged_while_dispose_saves_is_saved_too() {
    let (storage, gate) = FaultyStorage::new().holding(topic());
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone()).build();
    staged(&cache, 1);
    // The saver starts saving 1 and waits on the gate.
    advance(1).await;
    assert_eq!(storage.stores_started(), 1);
    let disposing = tokio::spawn({
        let cache = cache.clone();
        async move { cache.dispose().await }
    });
    advance(1).await;
    // Staged while the final save runs.
    staged(&cache, 2);
    gate.add_permits(2);
    disposing.within_limit().await.unwrap().unwrap();
    assert_eq!(saved(storage.records()).await, Some(Revision::new(2)));
    // After dispose, nothing more is staged or saved.
    staged(&cache, 3);
    assert!(matches!(cache.flush().await, Err(Error::Disposed)));
    assert_eq!(saved(storage.records()).await, Some(Revision::new(2)));
}

#[tokio::test(start_paused = true)]
async fn max_wait_bounds_the_debounce_but_the_throttle_still_holds() {
    let storage = MemoryStorage::new();
    let (seen, on_event) = events();
    let cache = SnapshotCache::<u64>::builder(topic(), storage.clone())
        .throttle(Duration::from_millis(500))
        .max_wait(Duration::from_millis(100))
        .on_event(on_event)
        .build();
    let start = tokio::time::Instant::now();
    let saves = Arc::new(Mutex::new(Vec::new()));
    for r in 1..=120 {
        staged(&cache, r);
        advance(10).await;
        let completed = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, CacheEvent::SaveCompleted { .. }))
            .count();
        let mut at = saves.lock().unwrap();
        if completed > at.len() {
            at.push(start.elapsed());
        }
    }
    let at = saves.lock().unwrap().clone();
    assert!(at.len() >= 2, "{at:?}");
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(500),
            "saves closer than the throttle: {at:?}"
        );
    }
}
