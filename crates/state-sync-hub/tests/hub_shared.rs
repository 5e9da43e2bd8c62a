//! Several hubs on one shared storage behave as one: the `testkit`
//! scenarios on the in-memory shared storage. The engine crates run the
//! same scenarios on real Redis and PostgreSQL.
#![allow(clippy::unwrap_used)]

use state_sync_hub::testkit;
use state_sync_storage::conformance::SharedMemory;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_on_three_hubs_increment_exactly_and_never_reuse_a_revision() {
    let storage = SharedMemory::new();
    testkit::increments_across_hubs(vec![storage.clone(), storage.clone(), storage], 8, 500).await;
}

#[tokio::test]
async fn compare_and_set_from_two_hubs_at_once_has_exactly_one_winner() {
    let storage = SharedMemory::new();
    testkit::one_compare_and_set_winner(storage.clone(), storage).await;
}

#[tokio::test]
async fn a_hub_catches_up_on_a_commit_whose_notification_was_lost() {
    let storage = SharedMemory::new();
    let muted = storage.clone();
    testkit::catches_up_after_lost_notifications(storage.clone(), storage, || async move {
        muted.mute(true);
    })
    .await;
}

#[tokio::test]
async fn revisions_never_go_backwards_when_the_storage_lost_its_data() {
    let storage = SharedMemory::new();
    let lost = storage.clone();
    testkit::never_backwards_after_data_loss(storage.clone(), storage, || async move {
        lost.lose_everything().await;
    })
    .await;
}
