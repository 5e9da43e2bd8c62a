//! The conformance suite every [`Storage`] backend must pass.
//!
//! # Usage
//!
//! ```
//! use state_sync_storage::{conformance, MemoryStorage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // For durable backends, `open` must return a new handle on the *same*
//! // underlying store each time, so the suite can check persistence.
//! let shared = MemoryStorage::new();
//! conformance::run(|| shared.clone()).await;
//! # }
//! ```

use state_sync::{Revision, Topic};

use crate::storage::{Record, Storage};

/// Runs every check against fresh handles from `open`, panicking with a
/// description on the first failure. The store must start empty.
///
/// # Panics
///
/// When the backend breaks the [`Storage`] contract.
pub async fn run<S: Storage>(open: impl Fn() -> S) {
    let store = open();
    let a = Topic::new("conformance:a").expect("valid topic");
    let b = Topic::new("conformance:b").expect("valid topic");

    assert_eq!(
        store.load(&a).await.expect("load"),
        None,
        "empty store has no record"
    );
    assert!(
        store.topics().await.expect("topics").is_empty(),
        "empty store lists no topics"
    );

    let first = Record::new(Revision::new(1), &br#"{"v":1}"#[..]);
    store.store(&a, &first).await.expect("store");
    assert_eq!(
        store.load(&a).await.expect("load"),
        Some(first),
        "load returns what was stored"
    );

    let second = Record::new(Revision::new(2), &br#"{"v":"\u00e9\u2603 two"}"#[..]);
    store.store(&a, &second).await.expect("store");
    assert_eq!(
        store.load(&a).await.expect("load").as_ref(),
        Some(&second),
        "latest store wins"
    );

    assert_eq!(
        store.load(&b).await.expect("load"),
        None,
        "topics are independent"
    );
    let big = Record::new(Revision::MAX, vec![b'x'; 1 << 20]);
    store.store(&b, &big).await.expect("store");
    assert_eq!(
        store.load(&b).await.expect("load"),
        Some(big.clone()),
        "large record and max revision"
    );
    assert_eq!(
        store.load(&a).await.expect("load").as_ref(),
        Some(&second),
        "other topic untouched"
    );

    let mut topics = store.topics().await.expect("topics");
    topics.sort();
    assert_eq!(
        topics,
        [a.clone(), b.clone()],
        "topics lists every stored topic"
    );

    drop(store);
    let reopened = open();
    assert_eq!(
        reopened.load(&a).await.expect("load"),
        Some(second),
        "records survive reopening"
    );
    assert_eq!(
        reopened.load(&b).await.expect("load"),
        Some(big),
        "records survive reopening"
    );

    reopened.remove(&b).await.expect("remove");
    assert_eq!(
        reopened.load(&b).await.expect("load"),
        None,
        "removed record is gone"
    );
    assert_eq!(
        reopened.topics().await.expect("topics"),
        std::slice::from_ref(&a),
        "removed topic is not listed"
    );
    reopened
        .remove(&b)
        .await
        .expect("removing again is not an error");
    drop(reopened);
    assert_eq!(
        open().load(&b).await.expect("load"),
        None,
        "removal survives reopening"
    );
    assert!(
        open().load(&a).await.expect("load").is_some(),
        "remove touches one topic"
    );
}
