//! The wire protocol: messages, error codes and their JSON encoding. See
//! `docs/PROTOCOL.md`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use state_sync::{Revision, Topic};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A message from client to server. Revisions and topics are kept as
/// strings here and checked by the server, so a bad one gets its own error
/// code.
///
/// Decode with [`ClientMessage::decode`]: `serde` cannot borrow the raw
/// `data` of `set` through an internally tagged enum.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
#[non_exhaustive]
pub enum ClientMessage {
    /// The first message: protocol version, who the client is, its token.
    Hello {
        /// Must be [`PROTOCOL_VERSION`].
        version: u32,
        /// A name for logs.
        client_id: String,
        /// The access token, if the server requires one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<Secret>,
    },
    /// Start receiving invalidations for `topic`.
    Subscribe {
        /// Request id, echoed in the answer.
        id: u64,
        /// The topic.
        topic: String,
        /// Whether invalidations may carry the topic's snapshot when it is
        /// small, saving the fetch that follows (default `false`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        inline: bool,
        /// With `inline`: whether an invalidation may carry a [`SnapshotDelta`]
        /// from the last snapshot this connection was sent, instead of the
        /// whole snapshot (default `false`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        delta: bool,
    },
    /// Stop receiving invalidations for `topic`.
    Unsubscribe {
        /// Request id.
        id: u64,
        /// The topic.
        topic: String,
    },
    /// Fetch a snapshot; with `ifNewerThan`, "not modified" when the topic
    /// is not newer.
    Get {
        /// Request id.
        id: u64,
        /// The topic.
        topic: String,
        /// The client's revision, as a canonical string.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_newer_than: Option<String>,
    },
    /// Write a topic; with `expectedRevision`, a compare-and-set.
    Set {
        /// Request id.
        id: u64,
        /// The topic.
        topic: String,
        /// The new value.
        data: Box<RawValue>,
        /// The revision the write is based on, as a canonical string.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_revision: Option<String>,
        /// Carried by the invalidation, so the writer can skip its own change.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_id: Option<String>,
    },
    /// Liveness check.
    Ping {
        /// Request id.
        id: u64,
    },
    /// The hub's state: its topics the client may read, connections,
    /// counters, and whether its storage fails.
    Status {
        /// Request id.
        id: u64,
    },
}

/// A secret, such as an access token: serialized as the plain string, but
/// `Debug` never shows it, so logging a message cannot leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A message from server to client.
///
/// Decode with [`ServerMessage::decode`], for the same reason as
/// [`ClientMessage`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
#[non_exhaustive]
pub enum ServerMessage {
    /// The answer to `hello`.
    Welcome {
        /// The protocol version the server speaks.
        version: u32,
        /// A name for logs.
        server_id: String,
    },
    /// `topic` is now at `revision`.
    Invalidation {
        /// The topic.
        topic: Topic,
        /// Its revision.
        revision: Revision,
        /// The writer, when it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_id: Option<String>,
        /// The topic's snapshot (at `revision` or newer), on subscriptions
        /// made with `inline` when it is small enough.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<InlineSnapshot>,
        /// The snapshot as a change to the last one this connection was
        /// sent, on subscriptions made with `delta`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<SnapshotDelta>,
    },
    /// The answer to `subscribe`: subscribed, and the current revision.
    Subscribed {
        /// Request id.
        id: u64,
        /// The topic.
        topic: Topic,
        /// Its current revision.
        revision: Revision,
    },
    /// The answer to `get`.
    Snapshot {
        /// Request id.
        id: u64,
        /// The topic.
        topic: Topic,
        /// The snapshot's revision.
        revision: Revision,
        /// The snapshot's data.
        data: Box<RawValue>,
    },
    /// The answer to a conditional `get` when the topic is not newer.
    NotModified {
        /// Request id.
        id: u64,
        /// The topic.
        topic: Topic,
        /// The topic's current revision.
        revision: Revision,
    },
    /// Success of `set` (with the new revision) or `unsubscribe`.
    Ok {
        /// Request id.
        id: u64,
        /// The committed revision, for `set`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<Revision>,
    },
    /// A compare-and-set found another revision.
    Conflict {
        /// Request id.
        id: u64,
        /// The topic.
        topic: Topic,
        /// The topic's current revision.
        current_revision: Revision,
    },
    /// The answer to `ping`.
    Pong {
        /// Request id.
        id: u64,
    },
    /// The answer to `status`.
    Status {
        /// Request id.
        id: u64,
        /// What the hub reports.
        status: HubStatus,
    },
    /// A request failed, or (without `id`) the connection is being closed.
    Error {
        /// The request's id, when the error answers one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// A stable code.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
}

/// A hub's state, from `status` ([`Client::hub_status`](crate::Client::hub_status),
/// `statesync status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct HubStatus {
    /// The server's name, as in `welcome`.
    pub server_id: String,
    /// Whether the hub keeps its topics in a storage shared with other
    /// hubs (Redis, PostgreSQL).
    pub shared_storage: bool,
    /// `true` while the storage fails: writes answer `storage`, reads serve
    /// the last known state, which on a shared storage may be stale.
    pub stale: bool,
    /// The open topics the asking client may read, by name.
    pub topics: Vec<TopicStatus>,
    /// Topics quarantined because their stored record is damaged (only
    /// those the client may read).
    pub damaged_topics: Vec<String>,
    /// Connections, subscriptions and counters, over the whole server.
    pub stats: crate::ServerStats,
    /// The hub process's CPU time and memory, where the platform tells
    /// them (Linux); absent elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<crate::ProcessStats>,
}

/// One topic in a [`HubStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct TopicStatus {
    /// The topic.
    pub topic: Topic,
    /// Its current revision.
    pub revision: Revision,
    /// Bytes of its JSON data.
    pub bytes: usize,
    /// Connections subscribed to it.
    pub subscribers: usize,
}

/// A snapshot carried by an invalidation: `{revision, data}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InlineSnapshot {
    /// The snapshot's revision, at least the invalidation's.
    pub revision: Revision,
    /// The value, as the hub encoded it.
    pub data: Box<RawValue>,
}

/// A snapshot sent as a change to an earlier one: the JSON text of the
/// snapshot at `revision` is the text at `base` with each of `splices`
/// made, and is `len` bytes long; the base text is `base_len` bytes long.
/// Offsets are in bytes of the base text and cut on UTF-8 character
/// boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotDelta {
    /// The revision whose text this changes.
    pub base: Revision,
    /// The snapshot's revision, at least the invalidation's.
    pub revision: Revision,
    /// The changes, in increasing order of offset, none overlapping.
    pub splices: Vec<Splice>,
    /// The new text's length in bytes.
    pub len: usize,
    /// The base text's length in bytes.
    pub base_len: usize,
}

/// One change, `[at, removed, inserted]` on the wire: `removed` bytes of
/// the base text from offset `at` are replaced with `inserted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splice(pub usize, pub usize, pub String);

/// Changed places closer than this are sent as one splice: a splice costs
/// more on the wire than a few unchanged bytes.
const SPLICE_GAP: usize = 16;

/// How long computing one delta may take; past it the diff is coarser (and
/// so, usually, too big to send).
const DIFF_DEADLINE: std::time::Duration = std::time::Duration::from_millis(2);

impl SnapshotDelta {
    /// The changes that turn `old` into `new`: the common start and end
    /// are kept, the rest diffed bytewise (Myers, bounded in time: past the
    /// deadline the diff is coarser), and the changes grouped into splices
    /// cut on character boundaries.
    pub fn between(base: Revision, old: &str, revision: Revision, new: &str) -> SnapshotDelta {
        Self::between_within(base, old, revision, new, Some(DIFF_DEADLINE))
    }

    /// [`SnapshotDelta::between`] with the diff's time limit given: `None`
    /// for the finest diff however long it takes (what tests compare).
    fn between_within(
        base: Revision,
        old: &str,
        revision: Revision,
        new: &str,
        limit: Option<std::time::Duration>,
    ) -> SnapshotDelta {
        let (old_b, new_b) = (old.as_bytes(), new.as_bytes());
        let prefix = old_b.iter().zip(new_b).take_while(|(a, b)| a == b).count();
        let room = old_b.len().min(new_b.len()) - prefix;
        let suffix = old_b
            .iter()
            .rev()
            .zip(new_b.iter().rev())
            .take(room)
            .take_while(|(a, b)| a == b)
            .count();
        let deadline = limit.map(|limit| std::time::Instant::now() + limit);
        let ops = similar::capture_diff_deadline(
            similar::Algorithm::Myers,
            old_b,
            prefix..old_b.len() - suffix,
            new_b,
            prefix..new_b.len() - suffix,
            deadline,
        );
        // Changed ranges (in old, in new), widened to character boundaries
        // (the bytes around a change are equal in both), then merged.
        let mut regions: Vec<(usize, usize, usize, usize)> = Vec::new();
        for op in ops {
            let (tag, o, n) = op.as_tag_tuple();
            if tag == similar::DiffTag::Equal {
                continue;
            }
            let (mut a, mut b, mut c, mut d) = (o.start, o.end, n.start, n.end);
            while a > 0 && c > 0 && !(old.is_char_boundary(a) && new.is_char_boundary(c)) {
                a -= 1;
                c -= 1;
            }
            while b < old.len()
                && d < new.len()
                && !(old.is_char_boundary(b) && new.is_char_boundary(d))
            {
                b += 1;
                d += 1;
            }
            match regions.last_mut() {
                Some(last) if a <= last.1 + SPLICE_GAP => {
                    last.1 = last.1.max(b);
                    last.3 = last.3.max(d);
                }
                _ => regions.push((a, b, c, d)),
            }
        }
        SnapshotDelta {
            base,
            revision,
            splices: regions
                .into_iter()
                .map(|(a, b, c, d)| Splice(a, b - a, new[c..d].to_owned()))
                .collect(),
            len: new.len(),
            base_len: old.len(),
        }
    }

    /// About how many bytes the delta takes on the wire.
    #[must_use]
    pub fn wire_len(&self) -> usize {
        self.splices.iter().map(|s| s.2.len() + 16).sum()
    }

    /// The new text from the base text, or `None` when `old` cannot be the
    /// base this delta was made from.
    #[must_use]
    pub fn apply(&self, old: &[u8]) -> Option<Vec<u8>> {
        if old.len() != self.base_len {
            return None;
        }
        // Check every splice and the resulting length before allocating:
        // `len` comes from the peer.
        let mut cursor = 0;
        let mut len = old.len();
        for Splice(at, removed, inserted) in &self.splices {
            let end = at.checked_add(*removed)?;
            if *at < cursor || end > old.len() {
                return None;
            }
            len = (len - removed).checked_add(inserted.len())?;
            cursor = end;
        }
        if len != self.len {
            return None;
        }
        let mut new = Vec::with_capacity(len);
        let mut cursor = 0;
        for Splice(at, removed, inserted) in &self.splices {
            new.extend_from_slice(&old[cursor..*at]);
            new.extend_from_slice(inserted.as_bytes());
            cursor = at + removed;
        }
        new.extend_from_slice(&old[cursor..]);
        Some(new)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SetFields {
    id: u64,
    topic: String,
    data: Box<RawValue>,
    /// `Some(None)` for an explicit `null`, which is refused: a client that
    /// meant a compare-and-set must not get an unconditional write.
    #[serde(default, deserialize_with = "present")]
    expected_revision: Option<Option<String>>,
    #[serde(default)]
    source_id: Option<String>,
}

/// Deserializes a field that is present, `null` included, as `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct SnapshotFields {
    id: u64,
    topic: Topic,
    revision: Revision,
    data: Box<RawValue>,
}

/// Decodes `frame` as `M`, except that a frame of type `raw_kind` (whose
/// raw `data` serde cannot carry through an internally tagged enum) is
/// decoded as the plain struct `F` and converted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvalidationFields {
    topic: Topic,
    revision: Revision,
    #[serde(default)]
    source_id: Option<String>,
    #[serde(default)]
    snapshot: Option<InlineSnapshot>,
    #[serde(default)]
    delta: Option<SnapshotDelta>,
}

/// Decodes JSON text. Valid UTF-8 (every frame a peer of this crate
/// sends) is checked once and read as text, so the parser does not check
/// each string again; anything else goes through the byte parser, for its
/// error.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// Whether `frame`'s `type` is `kind`. Frames written with `type` first (as
/// this crate writes them) are classified without a second parse.
fn is_kind(frame: &[u8], kind: &str) -> Result<bool, serde_json::Error> {
    Ok(match frame.strip_prefix(br#"{"type":""#) {
        Some(rest) => rest
            .strip_prefix(kind.as_bytes())
            .is_some_and(|after| after.first() == Some(&b'"')),
        None => from_json::<Envelope>(frame)?.kind == kind,
    })
}

/// Decodes `frame` through `F` when it is a `kind` message (one carrying
/// raw JSON, which `serde` cannot borrow through an internally tagged
/// enum), else returns `None`.
fn decode_raw<M, F>(frame: &[u8], kind: &str) -> Option<Result<M, serde_json::Error>>
where
    M: TryFrom<F, Error = serde_json::Error>,
    F: serde::de::DeserializeOwned,
{
    match is_kind(frame, kind) {
        Ok(true) => Some(from_json::<F>(frame).and_then(M::try_from)),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}

impl TryFrom<SetFields> for ClientMessage {
    type Error = serde_json::Error;

    fn try_from(f: SetFields) -> Result<Self, Self::Error> {
        let expected_revision = match f.expected_revision {
            Some(None) => {
                return Err(serde::de::Error::custom(
                    "expectedRevision is null: leave it out for an unconditional write",
                ));
            }
            Some(Some(revision)) => Some(revision),
            None => None,
        };
        Ok(ClientMessage::Set {
            id: f.id,
            topic: f.topic,
            data: f.data,
            expected_revision,
            source_id: f.source_id,
        })
    }
}

impl TryFrom<InvalidationFields> for ServerMessage {
    type Error = serde_json::Error;

    fn try_from(f: InvalidationFields) -> Result<Self, serde_json::Error> {
        Ok(ServerMessage::Invalidation {
            topic: f.topic,
            revision: f.revision,
            source_id: f.source_id,
            snapshot: f.snapshot,
            delta: f.delta,
        })
    }
}

impl TryFrom<SnapshotFields> for ServerMessage {
    type Error = serde_json::Error;

    fn try_from(f: SnapshotFields) -> Result<Self, serde_json::Error> {
        Ok(ServerMessage::Snapshot {
            id: f.id,
            topic: f.topic,
            revision: f.revision,
            data: f.data,
        })
    }
}

impl ClientMessage {
    /// Decodes one frame.
    ///
    /// # Errors
    ///
    /// Not JSON, an unknown `type`, or missing and ill-typed fields.
    pub fn decode(frame: &[u8]) -> Result<Self, serde_json::Error> {
        decode_raw::<Self, SetFields>(frame, "set").unwrap_or_else(|| from_json(frame))
    }
}

impl ServerMessage {
    /// Decodes one frame.
    ///
    /// # Errors
    ///
    /// Not JSON, an unknown `type`, or missing and ill-typed fields
    /// (including non-canonical revisions).
    pub fn decode(frame: &[u8]) -> Result<Self, serde_json::Error> {
        decode_raw::<Self, SnapshotFields>(frame, "snapshot")
            .or_else(|| decode_raw::<Self, InvalidationFields>(frame, "invalidation"))
            .unwrap_or_else(|| from_json(frame))
    }
}

/// Every error the server sends has one of these stable codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, or a known message with missing or ill-typed fields.
    BadRequest,
    /// A message `type` the server does not know.
    UnknownMessage,
    /// The first message was not `hello`.
    NotAuthenticated,
    /// The `hello` version is not supported.
    UnsupportedVersion,
    /// The token is missing or wrong.
    Unauthorized,
    /// The token may not read (or write) this topic.
    Forbidden,
    /// The topic name is not valid.
    InvalidTopic,
    /// No such topic on this server.
    UnknownTopic,
    /// A revision that is not a canonical decimal string.
    InvalidRevision,
    /// A frame or snapshot larger than the server's limit.
    TooLarge,
    /// The data does not fit the topic's type.
    InvalidData,
    /// The server's storage failed; nothing was committed.
    Storage,
    /// The server is shutting down.
    ShuttingDown,
    /// No message for longer than the idle timeout.
    IdleTimeout,
    /// The server has as many topics as it may; `set` cannot create one.
    TooManyTopics,
    /// The server has as many connections as it may.
    TooManyConnections,
    /// The topic's stored record is damaged; it is quarantined until an
    /// operator restores it. Other topics keep serving.
    Damaged,
    /// Anything else; see the message.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::InvalidRevision => "invalid_revision",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidData => "invalid_data",
            ErrorCode::Storage => "storage",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::TooManyTopics => "too_many_topics",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Damaged => "damaged",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for a hub error.
    #[must_use]
    pub fn from_hub(error: &state_sync_hub::Error) -> Self {
        use state_sync_hub::Error as E;
        match error {
            E::InvalidTopic(_) => ErrorCode::InvalidTopic,
            E::UnknownTopic { .. } => ErrorCode::UnknownTopic,
            E::InvalidData { .. } | E::TypeMismatch { .. } | E::Encode { .. } => {
                ErrorCode::InvalidData
            }
            E::Storage { .. } => ErrorCode::Storage,
            E::TooLarge { .. } => ErrorCode::TooLarge,
            E::TooManyTopics { .. } => ErrorCode::TooManyTopics,
            E::Damaged { .. } => ErrorCode::Damaged,
            E::Closed => ErrorCode::ShuttingDown,
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Just the fields every message has, to classify a frame before decoding
/// it fully.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) id: Option<u64>,
}

/// Every client message type (also the request metrics' labels).
pub(crate) const CLIENT_MESSAGE_TYPES: [&str; 7] = [
    "hello",
    "subscribe",
    "unsubscribe",
    "get",
    "set",
    "ping",
    "status",
];

/// Encodes a server message.
pub(crate) fn encode(message: &ServerMessage) -> Bytes {
    // Serializing these types cannot fail: no maps with non-string keys.
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// Encodes a snapshot answer around the hub's shared JSON encoding of the
/// data, which is copied in, never re-serialized.
pub(crate) fn encode_snapshot(id: u64, topic: &Topic, revision: Revision, data: &[u8]) -> Bytes {
    let topic = serde_json::to_string(topic.as_str()).unwrap_or_default();
    let mut out = BytesMut::with_capacity(64 + topic.len() + data.len());
    out.put_slice(br#"{"type":"snapshot","id":"#);
    out.put_slice(id.to_string().as_bytes());
    out.put_slice(br#","topic":"#);
    out.put_slice(topic.as_bytes());
    out.put_slice(br#","revision":""#);
    out.put_slice(revision.to_string().as_bytes());
    out.put_slice(br#"","data":"#);
    out.put_slice(data);
    out.put_u8(b'}');
    out.freeze()
}

/// An error message.
/// An invalidation frame; with `snapshot`, the topic's encoded snapshot is
/// spliced in as is.
pub(crate) fn encode_invalidation(
    topic: &Topic,
    revision: Revision,
    source_id: Option<&str>,
    snapshot: Option<(Revision, &[u8])>,
) -> Bytes {
    let json_string = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let topic = json_string(topic.as_str());
    let data_len = snapshot.map_or(0, |(_, data)| data.len() + 48);
    let mut out = BytesMut::with_capacity(96 + topic.len() + data_len);
    out.put_slice(br#"{"type":"invalidation","topic":"#);
    out.put_slice(topic.as_bytes());
    out.put_slice(br#","revision":""#);
    out.put_slice(revision.to_string().as_bytes());
    out.put_u8(b'"');
    if let Some(source_id) = source_id {
        out.put_slice(br#","sourceId":"#);
        out.put_slice(json_string(source_id).as_bytes());
    }
    if let Some((at, data)) = snapshot {
        out.put_slice(br#","snapshot":{"revision":""#);
        out.put_slice(at.to_string().as_bytes());
        out.put_slice(br#"","data":"#);
        out.put_slice(data);
        out.put_u8(b'}');
    }
    out.put_u8(b'}');
    out.freeze()
}

/// An invalidation carrying its snapshot as a delta.
pub(crate) fn encode_delta_invalidation(
    topic: &Topic,
    revision: Revision,
    source_id: Option<&str>,
    delta: &SnapshotDelta,
) -> Bytes {
    let plain = encode_invalidation(topic, revision, source_id, None);
    let delta = serde_json::to_vec(delta).unwrap_or_default();
    let mut out = BytesMut::with_capacity(plain.len() + delta.len() + 10);
    // `plain` ends with its closing brace.
    out.put_slice(&plain[..plain.len() - 1]);
    out.put_slice(br#","delta":"#);
    out.put_slice(&delta);
    out.put_u8(b'}');
    out.freeze()
}

/// The longest error message sent: an error never echoes a large input.
pub(crate) const MAX_ERROR_MESSAGE: usize = 512;

pub(crate) fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Bytes {
    crate::metrics::error_sent(code.as_str());
    let mut message = message.into();
    if message.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    encode(&ServerMessage::Error { id, code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bytes_decode_alike_and_invalid_utf8_is_an_error() {
        let frame = br#"{"type":"invalidation","topic":"t","revision":"3","sourceId":"w\u00e9"}"#;
        assert_eq!(
            from_json::<serde_json::Value>(frame).unwrap(),
            serde_json::from_slice::<serde_json::Value>(frame).unwrap()
        );
        assert!(matches!(
            ServerMessage::decode(frame).unwrap(),
            ServerMessage::Invalidation { revision, .. } if revision == Revision::new(3)
        ));
        // Invalid UTF-8 inside a string, and a lone byte: errors, never a
        // panic, and the same errors as the byte parser's.
        for bad in [&b"{\"type\":\"pong\",\"x\":\"\xff\"}"[..], b"\xfe"] {
            let ours = from_json::<serde_json::Value>(bad).unwrap_err().to_string();
            let theirs = serde_json::from_slice::<serde_json::Value>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs);
            assert!(ClientMessage::decode(bad).is_err());
        }
    }

    #[test]
    fn spliced_snapshot_decodes_as_a_snapshot_message() {
        let topic = Topic::new("se\"ttings").unwrap();
        let bytes = encode_snapshot(7, &topic, Revision::new(42), br#"{"a":[1,"\u00e9"]}"#);
        let ServerMessage::Snapshot {
            id,
            topic: t,
            revision,
            data,
        } = ServerMessage::decode(&bytes).unwrap()
        else {
            panic!("not a snapshot");
        };
        assert_eq!((id, t, revision), (7, topic, Revision::new(42)));
        assert_eq!(data.get(), r#"{"a":[1,"\u00e9"]}"#);
    }

    #[test]
    fn invalidations_encode_with_and_without_an_inline_snapshot() {
        let topic = Topic::new("t").unwrap();
        let plain = encode_invalidation(&topic, Revision::new(5), None, None);
        assert_eq!(
            &plain[..],
            br#"{"type":"invalidation","topic":"t","revision":"5"}"#
        );
        let inline = encode_invalidation(
            &topic,
            Revision::new(5),
            Some("w\"1"),
            Some((Revision::new(6), br#"{"x":[1]}"#)),
        );
        let ServerMessage::Invalidation {
            topic: t,
            revision,
            source_id,
            snapshot: Some(snapshot),
            ..
        } = ServerMessage::decode(&inline).unwrap()
        else {
            panic!("not an invalidation with a snapshot");
        };
        assert_eq!((t, revision), (topic, Revision::new(5)));
        assert_eq!(source_id.as_deref(), Some("w\"1"));
        assert_eq!(snapshot.revision, Revision::new(6));
        assert_eq!(snapshot.data.get(), r#"{"x":[1]}"#);
        // Written by another implementation: fields in any order.
        let foreign = br#"{"revision":"7","snapshot":{"data":2,"revision":"7"},"type":"invalidation","topic":"t"}"#;
        assert!(matches!(
            ServerMessage::decode(foreign).unwrap(),
            ServerMessage::Invalidation { snapshot: Some(s), .. } if s.data.get() == "2"
        ));
        // A non-canonical revision is rejected, inline or not.
        let bad = br#"{"type":"invalidation","topic":"t","revision":"7","snapshot":{"revision":"07","data":1}}"#;
        assert!(ServerMessage::decode(bad).is_err());
    }

    #[test]
    fn a_delta_rebuilds_the_new_text_from_its_base_only() {
        let long = "x".repeat(300);
        let cases = [
            (
                r#"{"seq":1,"p":"xxxx"}"#.to_owned(),
                r#"{"seq":2,"p":"xxxx"}"#.to_owned(),
            ),
            (r#"{"a":"é"}"#.to_owned(), r#"{"a":"è"}"#.to_owned()),
            ("abcabc".to_owned(), "abc".to_owned()),
            ("abc".to_owned(), "abcabc".to_owned()),
            (String::new(), "{}".to_owned()),
            ("same".to_owned(), "same".to_owned()),
            (r#"["ü","ü"]"#.to_owned(), r#"["ü","ü","ü"]"#.to_owned()),
            ("日本語のテキスト".to_owned(), "日本語テキスト".to_owned()),
            (format!("a{long}b{long}c"), format!("A{long}b{long}C")),
        ];
        for (old, new) in &cases {
            let delta = SnapshotDelta::between(Revision::new(1), old, Revision::new(2), new);
            assert_eq!(
                delta.apply(old.as_bytes()).as_deref(),
                Some(new.as_bytes()),
                "{old} -> {new}"
            );
            // Over the wire and back, it is the same delta.
            let wire: SnapshotDelta =
                serde_json::from_str(&serde_json::to_string(&delta).unwrap()).unwrap();
            assert_eq!(&wire, &delta);
        }
        // Two places far apart are two small splices, not one big one
        // (without the time limit, which a slow debug build can reach).
        let (old, new) = &cases[8];
        let delta =
            SnapshotDelta::between_within(Revision::new(1), old, Revision::new(2), new, None);
        assert_eq!(delta.splices.len(), 2, "{delta:?}");
        assert!(delta.wire_len() < 64);
        let delta = SnapshotDelta::between(
            Revision::new(1),
            r#"{"seq":1}"#,
            Revision::new(2),
            r#"{"seq":2}"#,
        );
        assert_eq!(delta.splices, [Splice(7, 1, "2".into())]);
        // A base of another length is refused, not patched into garbage.
        assert_eq!(delta.apply(b"{\"seq\":10}"), None);
        assert_eq!(delta.apply(b""), None);
        let frame = encode_delta_invalidation(
            &Topic::new("t").unwrap(),
            Revision::new(2),
            Some("w"),
            &delta,
        );
        let ServerMessage::Invalidation {
            revision,
            snapshot: None,
            delta: Some(wire),
            source_id,
            ..
        } = ServerMessage::decode(&frame).unwrap()
        else {
            panic!("not an invalidation with a delta");
        };
        assert_eq!(
            (revision, source_id.as_deref(), wire),
            (Revision::new(2), Some("w"), delta)
        );
    }

    proptest::proptest! {
        /// Any two texts: the delta between them rebuilds the second from
        /// the first, and only from the first.
        #[test]
        fn deltas_rebuild_any_text(
            old in "[a-c\u{e9}\u{65e5}\\\"]{0,200}",
            edits in proptest::collection::vec((0usize..200, 0usize..5, "[a-d\u{e8}]{0,6}"), 0..5),
        ) {
            let mut new = old.clone();
            for (at, removed, inserted) in edits {
                let mut at = at.min(new.len());
                while !new.is_char_boundary(at) { at -= 1; }
                let mut end = (at + removed).min(new.len());
                while !new.is_char_boundary(end) { end += 1; }
                new.replace_range(at..end, &inserted);
            }
            let delta = SnapshotDelta::between(Revision::new(1), &old, Revision::new(2), &new);
            proptest::prop_assert_eq!(delta.apply(old.as_bytes()), Some(new.clone().into_bytes()));
            let wire: SnapshotDelta = serde_json::from_str(&serde_json::to_string(&delta).unwrap()).unwrap();
            proptest::prop_assert_eq!(wire, delta);
        }

        /// Any delta at all, applied to any base: a result or `None`,
        /// never a panic.
        #[test]
        fn any_delta_on_any_base_never_panics(
            base in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            splices in proptest::collection::vec((0usize..80, 0usize..80, "[a-z]{0,4}"), 0..4),
            len in 0usize..100,
        ) {
            let delta = SnapshotDelta {
                base: Revision::new(1),
                revision: Revision::new(2),
                splices: splices.into_iter().map(|(a, r, i)| Splice(a, r, i)).collect(),
                len,
                base_len: base.len(),
            };
            if let Some(new) = delta.apply(&base) {
                proptest::prop_assert_eq!(new.len(), len);
            }
        }
    }

    #[test]
    fn a_hostile_delta_is_refused_not_applied() {
        let base = b"0123456789";
        let delta = |splices: Vec<Splice>, len| SnapshotDelta {
            base: Revision::new(1),
            revision: Revision::new(2),
            splices,
            len,
            base_len: base.len(),
        };
        // Out of bounds, overlapping, out of order, overflowing, wrong length.
        for bad in [
            delta(vec![Splice(9, 5, String::new())], 9),
            delta(vec![Splice(4, 2, "a".into()), Splice(5, 1, "b".into())], 9),
            delta(vec![Splice(6, 0, "a".into()), Splice(2, 0, "b".into())], 12),
            delta(vec![Splice(usize::MAX, 2, String::new())], 8),
            delta(vec![Splice(0, 1, "ab".into())], 10),
            // A length no splice makes: refused before anything is allocated.
            delta(vec![Splice(0, 1, "ab".into())], usize::MAX),
            delta(Vec::new(), 1 << 50),
        ] {
            assert_eq!(bad.apply(base), None, "{bad:?}");
        }
    }

    #[test]
    fn messages_are_camel_case_with_string_revisions() {
        let set = ClientMessage::decode(
            br#"{"type":"set","id":1,"topic":"t","data":{"x":1},"expectedRevision":"5","sourceId":"a"}"#,
        )
        .unwrap();
        assert!(
            matches!(set, ClientMessage::Set { expected_revision: Some(ref r), .. } if r == "5")
        );
        let conflict = encode(&ServerMessage::Conflict {
            id: 1,
            topic: Topic::new("t").unwrap(),
            current_revision: Revision::new(6),
        });
        assert_eq!(
            &conflict[..],
            br#"{"type":"conflict","id":1,"topic":"t","currentRevision":"6"}"#
        );
        let error = error(None, ErrorCode::TooLarge, "frame too large");
        assert_eq!(
            &error[..],
            br#"{"type":"error","code":"too_large","message":"frame too large"}"#
        );
    }
}
