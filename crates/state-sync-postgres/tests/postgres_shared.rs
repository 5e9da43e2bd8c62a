//! PostgresStorage on a real PostgreSQL started by the test: the storage
//! conformance suites and the several-hubs scenarios.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use state_sync_hub::testkit;
use state_sync_postgres::PostgresStorage;
use state_sync_postgres::testkit::PostgresServer;
use state_sync_storage::conformance;

async fn storages(server: &PostgresServer, count: usize) -> Vec<PostgresStorage> {
    let mut storages = Vec::new();
    for _ in 0..count {
        storages.push(PostgresStorage::connect(&server.config()).await.unwrap());
    }
    storages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_storage_conforms_as_a_shared_storage() {
    let server = PostgresServer::start();
    let handles = storages(&server, 2).await;
    conformance::run(|| handles[0].clone()).await;
    let next = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_shared(|| {
        handles[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2].clone()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hubs_on_postgres_behave_as_one() {
    let server = PostgresServer::start();
    testkit::increments_across_hubs(storages(&server, 3).await, 8, 100).await;
    let mut two = storages(&server, 2).await;
    let b = two.pop().unwrap();
    testkit::one_compare_and_set_winner(two.pop().unwrap(), b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_catch_up_after_the_listening_connection_is_terminated() {
    let server = PostgresServer::start();
    let mut two = storages(&server, 2).await;
    let b = two.pop().unwrap();
    let a = two.pop().unwrap();
    let config = server.config();
    testkit::catches_up_after_lost_notifications(a, b, || async move {
        let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
            .await
            .unwrap();
        let handle = tokio::spawn(connection);
        let killed = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        assert!(
            !killed.is_empty(),
            "a listening connection was there to kill"
        );
        drop(client);
        let _ = handle.await;
    })
    .await;
}
