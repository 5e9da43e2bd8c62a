//! Revisions, topics, invalidation events and snapshot envelopes from
//! arbitrary input: nothing panics, a parsed revision prints back as its
//! input (only the canonical form parses), a topic keeps its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use state_sync::{InvalidationEvent, Revision, SnapshotEnvelope, Topic};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(revision) = text.parse::<Revision>() {
            assert_eq!(revision.to_string(), text);
        }
        if let Ok(topic) = Topic::new(text) {
            assert!(topic.len() <= Topic::MAX_LEN);
            assert!(!topic.trim().is_empty());
        }
    }
    if let Ok(event) = InvalidationEvent::from_json(data) {
        let again = serde_json::to_vec(&event).unwrap();
        assert_eq!(InvalidationEvent::from_json(&again).unwrap(), event);
    }
    let _ = SnapshotEnvelope::<serde_json::Value>::from_json(data);
});
