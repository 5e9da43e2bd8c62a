//! A damaged store never makes the hub reuse a revision, and one damaged
//! topic never keeps the others from serving. Limits on what a hub holds.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use state_sync::{Revision, Topic};
use state_sync_hub::{Error, Hub};
use state_sync_storage::{FileStorage, Record, Storage};

fn topic(name: &str) -> Topic {
    Topic::new(name).unwrap()
}

/// Writes `values` to `name` through a hub on `dir`, closes it, and returns
/// the revision of each write.
async fn written(dir: &std::path::Path, name: &str, values: &[Value]) -> Vec<Revision> {
    let hub = Hub::new(FileStorage::open(dir).unwrap());
    let doc = hub.json_topic(name).await.unwrap();
    let mut revisions = Vec::new();
    for value in values {
        revisions.push(doc.replace(value.clone()).await.unwrap());
    }
    hub.close().await;
    revisions
}

fn damage_newest_copy(dir: &std::path::Path, name: &str) {
    let storage = FileStorage::open(dir).unwrap();
    let path = storage.path_of(&topic(name));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // the checksum no longer matches; the header does
    std::fs::write(&path, bytes).unwrap();
}

#[tokio::test]
async fn a_damaged_newest_record_falls_back_without_ever_reusing_a_revision() {
    let dir = tempfile::tempdir().unwrap();
    let revisions = written(dir.path(), "doc", &[json!(1), json!(2)]).await;
    let acknowledged = revisions[1];
    damage_newest_copy(dir.path(), "doc");

    // The first start already serves: the last good copy, above every
    // revision that may have been issued.
    let hub = Hub::new(FileStorage::open(dir.path()).unwrap());
    let opened = hub.open_stored_topics().await.unwrap();
    assert_eq!(opened, [topic("doc")]);
    let served = hub.get_json(&topic("doc")).unwrap();
    assert_eq!(&served.data[..], b"1", "the last good copy");
    assert!(
        served.revision > acknowledged,
        "{} must be above the lost {acknowledged}",
        served.revision
    );
    // A write now gets a revision no replica has seen for other data.
    let next = hub.set_json(&topic("doc"), b"3", None, None).await.unwrap();
    assert!(next > acknowledged);
    hub.close().await;

    // And a second start does not go back either.
    let hub = Hub::new(FileStorage::open(dir.path()).unwrap());
    hub.open_stored_topics().await.unwrap();
    let again = hub.get_json(&topic("doc")).unwrap();
    assert_eq!((again.revision, &again.data[..]), (next, &b"3"[..]));
}

#[tokio::test]
async fn one_damaged_topic_is_quarantined_and_reported_while_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    written(dir.path(), "good", &[json!("fine")]).await;
    written(dir.path(), "lost", &[json!(1)]).await;
    // Both copies of `lost` damaged: a single write leaves no backup, so
    // damaging the current file is enough.
    damage_newest_copy(dir.path(), "lost");
    // A record whose checksum is right but whose bytes are not JSON.
    let storage = FileStorage::open(dir.path()).unwrap();
    storage
        .store(
            &topic("garbled"),
            &Record::new(Revision::new(7), &b"{not json"[..]),
        )
        .await
        .unwrap();

    for _ in 0..2 {
        // Every start: the good topic serves, the others are reported.
        let hub = Hub::new(FileStorage::open(dir.path()).unwrap());
        let opened = hub.open_stored_topics().await.unwrap();
        assert_eq!(opened, [topic("good")]);
        let damaged: Vec<Topic> = hub.damaged_topics().into_iter().map(|(t, _)| t).collect();
        assert_eq!(damaged, [topic("garbled"), topic("lost")]);
        for name in ["lost", "garbled"] {
            let err = hub.get_json(&topic(name)).unwrap_err();
            assert_eq!(err.code(), "damaged", "{err}");
            let err = hub.json_topic(name).await.unwrap_err();
            assert_eq!(err.code(), "damaged", "{err}");
        }
        assert_eq!(&hub.get_json(&topic("good")).unwrap().data[..], b"\"fine\"");
        hub.close().await;
    }
}

#[tokio::test]
async fn the_size_limit_applies_to_the_encoding_that_is_stored_and_served() {
    let hub = Hub::in_memory();
    let doc = hub.json_topic("doc").await.unwrap();
    // 1e5 is 3 bytes as sent and 8 ("100000.0") as the hub encodes it.
    let data = format!("[{}]", vec!["1e5"; 100].join(","));
    let err = hub
        .set_json_limited(doc.topic(), data.as_bytes(), None, None, data.len() + 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { bytes, .. } if bytes > data.len() + 10),
        "{err}"
    );
    assert_eq!(err.code(), "too_large");
    assert_eq!(&hub.get_json(doc.topic()).unwrap().data[..], b"null");
    let fits = hub
        .set_json_limited(doc.topic(), b"[1]", None, None, 16)
        .await;
    assert!(fits.is_ok());
}

#[tokio::test]
async fn topics_are_capped_and_a_failed_creation_takes_no_room() {
    let hub = Hub::builder().max_topics(2).build();
    hub.json_topic("a").await.unwrap();
    // A failed open (typed topic over a record of another shape would do;
    // here an invalid name) leaves nothing behind.
    assert!(hub.json_topic(" ").await.is_err());
    hub.json_topic("b").await.unwrap();
    let err = hub.json_topic("c").await.unwrap_err();
    assert_eq!(err.code(), "too_many_topics", "{err}");
    assert_eq!(hub.topics().len(), 2);
    // Opening an open topic is still fine at the limit.
    hub.json_topic("a").await.unwrap();
}

#[tokio::test]
async fn a_topic_that_fails_to_open_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    storage
        .store(
            &topic("n"),
            &Record::new(Revision::new(3), &br#""text""#[..]),
        )
        .await
        .unwrap();
    let hub = Hub::builder().storage(storage).max_topics(1).build();
    // Opening `n` as a number fails: the stored value is a string.
    let err = hub.topic("n", || 0u64).await.unwrap_err();
    assert_eq!(err.code(), "invalid_data");
    assert!(hub.topics().is_empty());
    // Its failed slot did not use up the only place.
    hub.json_topic("other").await.unwrap();
}
