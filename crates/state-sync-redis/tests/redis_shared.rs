//! RedisStorage on a real `redis-server`, started by the test on a free
//! loopback port (no persistence, data in a temp dir) and stopped by PID:
//! the storage conformance suites and the several-hubs scenarios.
#![allow(clippy::unwrap_used)]

use state_sync::testkit::WithinLimit;
use state_sync_hub::testkit;
use state_sync_redis::RedisStorage;
use state_sync_redis::testkit::RedisServer;
use state_sync_storage::conformance;

async fn storages(server: &RedisServer, prefix: &str, count: usize) -> Vec<RedisStorage> {
    let mut storages = Vec::new();
    for _ in 0..count {
        storages.push(
            RedisStorage::connect_with_prefix(&server.url(), prefix)
                .await
                .unwrap(),
        );
    }
    storages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_storage_conforms_as_a_shared_storage() {
    let server = RedisServer::start();
    let storage = storages(&server, "conformance", 1).await.remove(0);
    conformance::run(|| storage.clone()).await;
    let second = storages(&server, "conformance", 1).await.remove(0);
    let handles = [storage, second];
    let next = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_shared(|| {
        handles[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2].clone()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_on_three_hubs_increment_exactly_on_redis() {
    let server = RedisServer::start();
    let storages = storages(&server, "increments", 3).await;
    testkit::increments_across_hubs(storages, 8, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_from_two_hubs_has_one_winner_on_redis() {
    let server = RedisServer::start();
    let mut storages = storages(&server, "cas", 2).await;
    let b = storages.pop().unwrap();
    testkit::one_compare_and_set_winner(storages.pop().unwrap(), b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_catch_up_after_the_notification_connection_is_killed() {
    let server = RedisServer::start();
    let mut storages = storages(&server, "notify", 2).await;
    let b = storages.pop().unwrap();
    let a = storages.pop().unwrap();
    let server = &server;
    testkit::catches_up_after_lost_notifications(a, b, || async move {
        let killed = server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.trim().parse::<u32>().unwrap() >= 1, "{killed}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_never_go_backwards_when_redis_restarts_without_persistence() {
    let mut server = RedisServer::start();
    let mut storages = storages(&server, "loss", 2).await;
    let b = storages.pop().unwrap();
    let a = storages.pop().unwrap();
    let server = std::sync::Mutex::new(&mut server);
    testkit::never_backwards_after_data_loss(a, b, || async {
        server.lock().unwrap().restart();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_writes_fail_reads_serve_the_last_state_marked_stale() {
    use state_sync_hub::Hub;
    let mut server = RedisServer::start();
    let hub = Hub::new(storages(&server, "down", 1).await.remove(0));
    let doc = hub.json_topic("doc").await.unwrap();
    let acknowledged = doc.replace(serde_json::json!("before")).await.unwrap();
    assert_eq!(hub.storage_failure(), None);

    server.stop();
    let err = doc.replace(serde_json::json!("lost?")).await.unwrap_err();
    assert_eq!(err.code(), "storage", "{err}");
    let served = doc.get();
    assert_eq!(
        (served.revision(), served.value()),
        (acknowledged, &serde_json::json!("before"))
    );
    assert!(hub.storage_failure().is_some(), "marked stale");

    // Back: the hub reconnects by itself; nothing acknowledged is lost (the
    // restarted Redis is empty, and the hub writes above what it had).
    server.resume();
    let after = async {
        loop {
            match doc.replace(serde_json::json!("after")).await {
                Ok(revision) => break revision,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }
    .within_limit()
    .await;
    assert!(after > acknowledged);
    assert_eq!(hub.storage_failure(), None);
}
