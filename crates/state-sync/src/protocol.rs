//! Wire shapes shared with the JavaScript packages: [`InvalidationEvent`]
//! and [`SnapshotEnvelope`], and the [`ProtocolError`] for payloads that do
//! not match them.
//!
//! ```text
//! invalidation: {"topic": "settings", "revision": "42", "sourceId"?: "win-a", "timestampMs"?: 1700000000000}
//! snapshot:     {"revision": "42", "data": <any JSON>}
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::revision::{ParseRevisionError, Revision, json_type_name};
use crate::topic::Topic;

/// "Topic `topic` is now at revision `revision`": the signal that makes
/// replicas fetch a fresh snapshot.
///
/// Serialized in camelCase. When decoding, unknown fields are ignored and a
/// `sourceId` or `timestampMs` of the wrong type counts as absent; the topic
/// and revision are strict.
///
/// # Examples
///
/// ```
/// use state_sync::{InvalidationEvent, Revision};
///
/// let event = InvalidationEvent::from_json(
///     br#"{"topic":"settings","revision":"7","sourceId":42,"extra":true}"#,
/// )?;
/// assert_eq!(event.topic, "settings");
/// assert_eq!(event.revision, Revision::new(7));
/// assert_eq!(event.source_id, None); // wrong type: treated as absent
/// # Ok::<(), state_sync::ProtocolError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "Value")]
pub struct InvalidationEvent {
    /// The topic that changed.
    pub topic: Topic,
    /// The topic's revision after the change.
    pub revision: Revision,
    /// Who made the change (a window label, a client id), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// When the change was committed, in milliseconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<u64>,
}

impl InvalidationEvent {
    /// An event without source id or timestamp.
    #[must_use]
    pub fn new(topic: Topic, revision: Revision) -> Self {
        InvalidationEvent {
            topic,
            revision,
            source_id: None,
            timestamp_ms: None,
        }
    }

    /// Sets the source id.
    #[must_use]
    pub fn with_source_id(mut self, source_id: impl Into<String>) -> Self {
        self.source_id = Some(source_id.into());
        self
    }

    /// Sets the timestamp.
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Decodes a raw JSON payload as delivered by a transport.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] keeping (a prefix of) the raw payload: malformed
    /// JSON, not an object, missing or blank topic, missing or non-canonical
    /// revision.
    pub fn from_json(raw: &[u8]) -> Result<Self, ProtocolError> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| {
            ProtocolError::new(ProtocolErrorKind::Malformed(e.to_string())).with_raw_bytes(raw)
        })?;
        Self::from_value(&value).map_err(|e| e.with_raw_bytes(raw))
    }

    /// Decodes an already parsed JSON value.
    ///
    /// # Errors
    ///
    /// As [`InvalidationEvent::from_json`].
    pub fn from_value(value: &Value) -> Result<Self, ProtocolError> {
        let fail = |kind| Err(ProtocolError::new(kind).with_raw_value(value));
        let Value::Object(map) = value else {
            return fail(ProtocolErrorKind::Malformed(format!(
                "expected an object, found {}",
                json_type_name(value)
            )));
        };
        let topic = match map.get("topic") {
            Some(Value::String(t)) => match Topic::new(t) {
                Ok(topic) => topic,
                Err(_) => return fail(ProtocolErrorKind::EmptyTopic),
            },
            Some(_) | None => return fail(ProtocolErrorKind::EmptyTopic),
        };
        let revision = match map.get("revision") {
            Some(v) => match Revision::from_json_value(v) {
                Ok(r) => r,
                Err(e) => {
                    return Err(ProtocolError::new(ProtocolErrorKind::InvalidRevision(e))
                        .with_topic(topic)
                        .with_raw_value(value));
                }
            },
            None => {
                return Err(ProtocolError::new(ProtocolErrorKind::InvalidRevision(
                    ParseRevisionError::Empty,
                ))
                .with_topic(topic)
                .with_raw_value(value));
            }
        };
        let source_id = match map.get("sourceId") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let timestamp_ms = map.get("timestampMs").and_then(lenient_timestamp);
        Ok(InvalidationEvent {
            topic,
            revision,
            source_id,
            timestamp_ms,
        })
    }
}

/// JavaScript's `Date.now()` is a float-typed integer; accept any
/// non-negative integral number.
fn lenient_timestamp(value: &Value) -> Option<u64> {
    let n = value.as_number()?;
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

impl TryFrom<Value> for InvalidationEvent {
    type Error = ProtocolError;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        InvalidationEvent::from_value(&value)
    }
}

impl fmt::Debug for InvalidationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("InvalidationEvent");
        s.field("topic", &self.topic)
            .field("revision", &self.revision);
        if let Some(id) = &self.source_id {
            s.field("source_id", id);
        }
        if let Some(ts) = &self.timestamp_ms {
            s.field("timestamp_ms", ts);
        }
        s.finish()
    }
}

/// The canonical state of a topic at one revision: `{revision, data}`.
///
/// # Examples
///
/// ```
/// use state_sync::{Revision, SnapshotEnvelope};
///
/// let snap: SnapshotEnvelope = SnapshotEnvelope::from_json(br#"{"revision":"3","data":{"theme":"dark"}}"#)?;
/// assert_eq!(snap.revision, Revision::new(3));
/// assert_eq!(snap.data["theme"], "dark");
///
/// let err = SnapshotEnvelope::<serde_json::Value>::from_json(br#"{"revision":"03","data":1}"#).unwrap_err();
/// assert!(err.raw().unwrap().contains("03"));
/// # Ok::<(), state_sync::ProtocolError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnvelope<T = Value> {
    /// The revision of `data`.
    pub revision: Revision,
    /// The state.
    pub data: T,
}

impl<T> SnapshotEnvelope<T> {
    /// Wraps data at a revision.
    pub fn new(revision: Revision, data: T) -> Self {
        SnapshotEnvelope { revision, data }
    }

    /// Maps the data, keeping the revision.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> SnapshotEnvelope<U> {
        SnapshotEnvelope {
            revision: self.revision,
            data: f(self.data),
        }
    }
}

impl<T: serde::de::DeserializeOwned> SnapshotEnvelope<T> {
    /// Decodes a raw JSON snapshot.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] keeping the raw payload: malformed JSON, a missing
    /// or non-canonical revision, or `data` that does not decode as `T`.
    pub fn from_json(raw: &[u8]) -> Result<Self, ProtocolError> {
        #[derive(Deserialize)]
        struct Wire<T> {
            revision: Option<Value>,
            data: Option<T>,
        }
        let wire: Wire<T> = serde_json::from_slice(raw).map_err(|e| {
            ProtocolError::new(ProtocolErrorKind::Malformed(e.to_string())).with_raw_bytes(raw)
        })?;
        let revision = wire
            .revision
            .as_ref()
            .ok_or(ParseRevisionError::Empty)
            .and_then(Revision::from_json_value)
            .map_err(|e| {
                ProtocolError::new(ProtocolErrorKind::InvalidRevision(e)).with_raw_bytes(raw)
            })?;
        let data = wire.data.ok_or_else(|| {
            ProtocolError::new(ProtocolErrorKind::Malformed("missing field `data`".into()))
                .with_raw_bytes(raw)
        })?;
        Ok(SnapshotEnvelope { revision, data })
    }
}

/// How much of a bad payload an error keeps for the report.
const RAW_LIMIT: usize = 4096;

/// Cuts `text` to at most [`RAW_LIMIT`] bytes on a char boundary.
fn truncate(mut text: String) -> String {
    if text.len() > RAW_LIMIT {
        let mut end = RAW_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A payload that does not follow the protocol. Keeps the raw payload
/// (truncated to 4 KiB) so the report shows what actually arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    kind: ProtocolErrorKind,
    topic: Option<Topic>,
    raw: Option<String>,
}

/// What is wrong with a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolErrorKind {
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The topic is missing, not a string, or blank.
    #[error("missing or empty topic")]
    EmptyTopic,
    /// The revision is missing or not canonical.
    #[error("invalid revision: {0}")]
    InvalidRevision(#[source] ParseRevisionError),
}

impl ProtocolError {
    /// A new error of this kind.
    #[must_use]
    pub fn new(kind: ProtocolErrorKind) -> Self {
        ProtocolError {
            kind,
            topic: None,
            raw: None,
        }
    }

    /// Records the topic the payload named, when it could be read.
    #[must_use]
    pub fn with_topic(mut self, topic: Topic) -> Self {
        self.topic = Some(topic);
        self
    }

    /// Keeps the raw payload for the report.
    #[must_use]
    pub fn with_raw_bytes(mut self, raw: &[u8]) -> Self {
        let end = raw.len().min(RAW_LIMIT);
        self.raw = Some(truncate(String::from_utf8_lossy(&raw[..end]).into_owned()));
        self
    }

    /// Keeps a parsed payload for the report.
    #[must_use]
    pub fn with_raw_value(mut self, value: &Value) -> Self {
        self.raw = Some(truncate(value.to_string()));
        self
    }

    /// What is wrong.
    #[must_use]
    pub fn kind(&self) -> &ProtocolErrorKind {
        &self.kind
    }

    /// The topic the payload named, if it could be read.
    #[must_use]
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref()
    }

    /// The raw payload (at most 4 KiB of it).
    #[must_use]
    pub fn raw(&self) -> Option<&str> {
        self.raw.as_deref()
    }
}

impl From<ProtocolErrorKind> for ProtocolError {
    fn from(kind: ProtocolErrorKind) -> Self {
        ProtocolError::new(kind)
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.kind)?;
        if let Some(raw) = &self.raw {
            write!(f, " (payload: {raw})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ProtocolErrorKind::InvalidRevision(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_serializes_camel_case_and_skips_absent_fields() {
        let topic = Topic::new("settings").unwrap();
        let e = InvalidationEvent::new(topic.clone(), Revision::new(42));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"topic":"settings","revision":"42"}"#
        );
        let e = e.with_source_id("a").with_timestamp_ms(1_700_000_000_000);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"topic":"settings","revision":"42","sourceId":"a","timestampMs":1700000000000}"#
        );
        let back: InvalidationEvent =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn optional_fields_of_the_wrong_type_count_as_absent() {
        let e = InvalidationEvent::from_json(
            br#"{"topic":"t","revision":"1","sourceId":{"x":1},"timestampMs":"soon","other":[]}"#,
        )
        .unwrap();
        assert_eq!(e.source_id, None);
        assert_eq!(e.timestamp_ms, None);
        let e =
            InvalidationEvent::from_json(br#"{"topic":"t","revision":"1","timestampMs":1.7e12}"#)
                .unwrap();
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn bad_events_keep_the_raw_payload() {
        type Case = (&'static [u8], fn(&ProtocolErrorKind) -> bool);
        let cases: [Case; 6] = [
            (b"not json", |k| {
                matches!(k, ProtocolErrorKind::Malformed(_))
            }),
            (b"[1]", |k| matches!(k, ProtocolErrorKind::Malformed(_))),
            (br#"{"topic":"","revision":"1"}"#, |k| {
                matches!(k, ProtocolErrorKind::EmptyTopic)
            }),
            (br#"{"revision":"1"}"#, |k| {
                matches!(k, ProtocolErrorKind::EmptyTopic)
            }),
            (br#"{"topic":"t","revision":"01"}"#, |k| {
                matches!(k, ProtocolErrorKind::InvalidRevision(_))
            }),
            (br#"{"topic":"t","revision":1}"#, |k| {
                matches!(k, ProtocolErrorKind::InvalidRevision(_))
            }),
        ];
        for (raw, check) in cases {
            let err = InvalidationEvent::from_json(raw).unwrap_err();
            assert!(check(err.kind()), "{err}");
            assert_eq!(err.raw().unwrap(), std::str::from_utf8(raw).unwrap());
        }
        let err = InvalidationEvent::from_json(br#"{"topic":"t","revision":"x"}"#).unwrap_err();
        assert_eq!(err.topic().unwrap().as_str(), "t");
    }

    #[test]
    fn raw_payload_is_truncated_on_a_char_boundary() {
        let big = format!("{{\"topic\":\"\",\"x\":\"{}\"}}", "é".repeat(5000));
        let err = InvalidationEvent::from_json(big.as_bytes()).unwrap_err();
        assert!(err.raw().unwrap().len() <= RAW_LIMIT);
    }

    #[test]
    fn snapshot_round_trips_and_rejects_bad_revisions() {
        let snap = SnapshotEnvelope::new(Revision::new(5), serde_json::json!({"a": 1}));
        let json = serde_json::to_vec(&snap).unwrap();
        assert_eq!(json, br#"{"revision":"5","data":{"a":1}}"#);
        assert_eq!(SnapshotEnvelope::from_json(&json).unwrap(), snap);
        for bad in [
            &br#"{"revision":5,"data":1}"#[..],
            br#"{"revision":"","data":1}"#,
            br#"{"data":1}"#,
            br#"{"revision":"1"}"#,
        ] {
            assert!(SnapshotEnvelope::<Value>::from_json(bad).is_err());
        }
    }
}
