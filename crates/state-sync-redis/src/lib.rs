//! Redis as the shared [`Storage`] of several state-sync hubs.
//!
//! Every hub of a group opens a [`RedisStorage`] on the same Redis and
//! builds its [`Hub`](https://docs.rs/state-sync-hub) on it; the hubs then
//! behave as one source of truth:
//!
//! - **Commits are compare-and-sets in Redis**: one Lua script checks the
//!   stored revision, writes the record, adds the topic to the topic set
//!   and publishes the change, atomically. Two hubs writing at once: one
//!   wins, the other takes in the winner's record and applies its writes
//!   again (or answers `conflict` to a compare-and-set).
//! - **Changes travel over pub/sub**: `"<revision> <topic>"` on one channel.
//!   Pub/sub loses messages while its connection is down, so after every
//!   reconnect this storage reports [`Change::Resync`] and each hub re-reads
//!   the topics it serves (hubs also probe periodically).
//! - Revisions never go backwards, also when Redis lost its data (restarted
//!   without persistence): a hub writes above what it last saw, and new
//!   topics start at the wall clock in microseconds.
//!
//! # Keys
//!
//! With the default prefix `statesync`: `statesync:t:<topic>` is a hash
//! (`r`: the revision as a decimal string, `d`: the data as JSON),
//! `statesync:topics` the set of topics, `statesync:changes` the channel.
//!
//! # Examples
//!
//! ```no_run
//! use state_sync_hub::Hub;
//! use state_sync_redis::RedisStorage;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = std::env::var("STATESYNC_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
//! // Every hub of the group does the same, on the same Redis.
//! let hub = Hub::new(RedisStorage::connect(&url).await?);
//! let settings = hub.json_topic("settings").await?;
//! settings.replace(serde_json::json!({"theme": "dark"})).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `testkit` | no | `testkit::RedisServer`: a real `redis-server` for tests |
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "testkit")]
pub mod testkit;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use state_sync::{Revision, Topic};
use state_sync_storage::{Change, Error, Record, Result, Storage, Stored};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The compare-and-set commit. KEYS: record, topic set. ARGV: expected
/// revision (`""`: none stored, `"*"`: any), new revision, data, channel,
/// topic. Returns `{1}` when stored, else `{0, revision, data}` (or `{0}`
/// when nothing is stored).
const STORE_IF: &str = r"
local current = redis.call('HMGET', KEYS[1], 'r', 'd')
if ARGV[1] ~= '*' and (current[1] or '') ~= ARGV[1] then
  if current[1] then return {0, current[1], current[2]} end
  return {0}
end
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'd', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[2] .. ' ' .. ARGV[5])
return {1}
";

/// A [`Storage`] on Redis shared by several hubs. Cheap to clone; the
/// notification task ends when the last clone is dropped.
#[derive(Clone)]
pub struct RedisStorage {
    inner: Arc<Inner>,
}

struct Inner {
    commands: ConnectionManager,
    script: redis::Script,
    prefix: String,
    /// The URL with any password replaced, for logs.
    shown_url: String,
    changes: broadcast::Sender<Change>,
    _stop: DropGuard,
}

impl fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorage")
            .field("url", &self.inner.shown_url)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        backend: "redis",
        source: Box::new(e),
    }
}

fn malformed(what: String) -> Error {
    Error::Backend {
        backend: "redis",
        source: what.into(),
    }
}

/// `url` with the password (if any) replaced by `***`.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisStorage {
    /// Connects to Redis at `url` (`redis://[:password@]host:port[/db]`)
    /// with the key prefix `statesync`. The command connection reconnects
    /// by itself; each command fails after 5 s without an answer (a write
    /// then fails with the `storage` code, and nothing is committed).
    ///
    /// # Errors
    ///
    /// A malformed URL. An unreachable server is not an error here: the
    /// storage connects lazily and keeps trying.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: nothing is started until it returns.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_prefix(url, "statesync").await
    }

    /// As [`connect`](Self::connect), with keys under `prefix` (several
    /// groups of hubs can share one Redis).
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let commands =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(backend)?;
        let (changes, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let shown_url = redacted(url);
        let channel = format!("{prefix}:changes");
        let subscribe = move || {
            let client = client.clone();
            let channel = channel.clone();
            async move {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub.into_on_message().map(|message| {
                    String::from_utf8_lossy(message.get_payload_bytes()).into_owned()
                }))
            }
        };
        tokio::spawn(state_sync_storage::run_listener(
            "redis",
            subscribe,
            changes.clone(),
            stop.clone(),
        ));
        Ok(RedisStorage {
            inner: Arc::new(Inner {
                commands,
                script: redis::Script::new(STORE_IF),
                prefix: prefix.to_owned(),
                shown_url,
                changes,
                _stop: stop.drop_guard(),
            }),
        })
    }

    fn record_key(&self, topic: &Topic) -> String {
        format!("{}:t:{topic}", self.inner.prefix)
    }

    fn topics_key(&self) -> String {
        format!("{}:topics", self.inner.prefix)
    }

    async fn run_store(&self, topic: &Topic, expected: &str, record: &Record) -> Result<Stored> {
        let mut connection = self.inner.commands.clone();
        let answer: Vec<redis::Value> = self
            .inner
            .script
            .key(self.record_key(topic))
            .key(self.topics_key())
            .arg(expected)
            .arg(record.revision.to_string())
            .arg(&record.data[..])
            .arg(format!("{}:changes", self.inner.prefix))
            .arg(topic.as_str())
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        match answer.as_slice() {
            [redis::Value::Int(1)] => Ok(Stored::Committed),
            [redis::Value::Int(0)] => Ok(Stored::Conflict(None)),
            [redis::Value::Int(0), revision, data] => {
                Ok(Stored::Conflict(Some(record_from(revision, data)?)))
            }
            other => Err(malformed(format!("unexpected script answer {other:?}"))),
        }
    }
}

fn bytes_of(value: &redis::Value) -> Option<&[u8]> {
    match value {
        redis::Value::BulkString(bytes) => Some(bytes),
        redis::Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn record_from(revision: &redis::Value, data: &redis::Value) -> Result<Record> {
    let revision = bytes_of(revision)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|text| text.parse::<Revision>().ok())
        .ok_or_else(|| malformed(format!("a stored revision is not a revision: {revision:?}")))?;
    let data = bytes_of(data).ok_or_else(|| malformed("a stored record has no data".into()))?;
    Ok(Record::new(revision, Bytes::copy_from_slice(data)))
}

impl Storage for RedisStorage {
    async fn load(&self, topic: &Topic) -> Result<Option<Record>> {
        let mut connection = self.inner.commands.clone();
        let fields: Vec<redis::Value> = redis::cmd("HMGET")
            .arg(self.record_key(topic))
            .arg("r")
            .arg("d")
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        match fields.as_slice() {
            [redis::Value::Nil, _] | [] => Ok(None),
            [revision, data] => record_from(revision, data).map(Some),
            other => Err(malformed(format!("unexpected HMGET answer {other:?}"))),
        }
    }

    async fn store(&self, topic: &Topic, record: &Record) -> Result<()> {
        self.run_store(topic, "*", record).await.map(drop)
    }

    async fn remove(&self, topic: &Topic) -> Result<()> {
        let mut connection = self.inner.commands.clone();
        redis::pipe()
            .atomic()
            .del(self.record_key(topic))
            .srem(self.topics_key(), topic.as_str())
            .query_async::<()>(&mut connection)
            .await
            .map_err(backend)
    }

    async fn topics(&self) -> Result<Vec<Topic>> {
        let mut connection = self.inner.commands.clone();
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.topics_key())
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        let mut topics: Vec<Topic> = names
            .into_iter()
            .filter_map(|name| Topic::new(name).ok())
            .collect();
        topics.sort();
        Ok(topics)
    }

    async fn store_if(
        &self,
        topic: &Topic,
        expected: Option<Revision>,
        record: &Record,
    ) -> Result<Stored> {
        let expected = expected.map(|r| r.to_string()).unwrap_or_default();
        self.run_store(topic, &expected, record).await
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.inner.changes.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted("redis://:s3cret@host:6379/2"),
            "redis://:***@host:6379/2"
        );
        assert_eq!(redacted("redis://user:pw@host"), "redis://user:***@host");
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
    }
}
