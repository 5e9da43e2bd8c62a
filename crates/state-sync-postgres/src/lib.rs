//! PostgreSQL as the shared [`Storage`] of several state-sync hubs.
//!
//! Every hub of a group opens a [`PostgresStorage`] on the same database and
//! builds its hub on it; the hubs then behave as one source of truth:
//!
//! - **Commits are compare-and-sets in one transaction**: an
//!   `UPDATE … WHERE topic = $1 AND revision = $2` (or an `INSERT … ON
//!   CONFLICT DO NOTHING` for a new topic) and, when a row changed,
//!   `pg_notify` with `"<revision> <topic>"` — never the data, well under
//!   NOTIFY's 8 000-byte limit — sent when the transaction commits.
//! - **Changes travel over `LISTEN`** on a connection of its own. What is
//!   notified while it is down is lost, so after every reconnect this
//!   storage reports [`Change::Resync`] and each hub re-reads the topics it
//!   serves (hubs also probe periodically).
//! - Revisions are kept as canonical decimal text, so the whole `u64` range
//!   fits, and compared for equality only.
//!
//! # Table
//!
//! `statesync_topics (topic text primary key, revision text, data bytea)`,
//! created if missing; notifications on channel `statesync`.
//!
//! # Examples
//!
//! ```no_run
//! use state_sync_hub::Hub;
//! use state_sync_postgres::PostgresStorage;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = std::env::var("STATESYNC_POSTGRES_URL")
//!     .unwrap_or("host=127.0.0.1 user=postgres dbname=postgres".into());
//! // Every hub of the group does the same, on the same database.
//! let hub = Hub::new(PostgresStorage::connect(&config).await?);
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
//! | `testkit` | no | `testkit::PostgresServer`: a real PostgreSQL for tests |
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "testkit")]
pub mod testkit;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use state_sync::{Revision, Topic};
use state_sync_storage::{Change, Error, Record, Result, Storage, Stored};
use tokio::sync::{Mutex, broadcast};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::{CancellationToken, DropGuard};

const CHANNEL: &str = "statesync";
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS statesync_topics (
    topic text PRIMARY KEY,
    revision text NOT NULL,
    data bytea NOT NULL
)";

/// A [`Storage`] on PostgreSQL shared by several hubs. Cheap to clone; the
/// listening task ends when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

struct Inner {
    config: String,
    /// The command connection, reconnected when it broke. One per hub:
    /// commits of different topics take turns on it.
    client: Mutex<Option<Client>>,
    changes: broadcast::Sender<Change>,
    _stop: DropGuard,
}

impl fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage").finish_non_exhaustive()
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend {
        backend: "postgres",
        source: Box::new(e),
    }
}

fn malformed(what: String) -> Error {
    Error::Backend {
        backend: "postgres",
        source: what.into(),
    }
}

/// Opens a connection and drives it on a task of its own.
async fn connect(config: &str) -> Result<Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(config, NoTls),
    )
    .await
    .map_err(|_| malformed("no connection within 5 s".into()))?
    .map_err(backend)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

impl PostgresStorage {
    /// Connects with a libpq-style configuration (`host=… port=… user=…
    /// dbname=…`, or a `postgresql://` URL) and creates the table if it is
    /// missing. Give a configuration with a password through an environment
    /// variable or a file, never a command line.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached or the table created.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: nothing is started until it returns.
    pub async fn connect(config: &str) -> Result<Self> {
        let client = connect(config).await?;
        client.batch_execute(SCHEMA).await.map_err(backend)?;
        let (changes, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(state_sync_storage::run_listener(
            "postgres",
            listening(config.to_owned()),
            changes.clone(),
            stop.clone(),
        ));
        Ok(PostgresStorage {
            inner: Arc::new(Inner {
                config: config.to_owned(),
                client: Mutex::new(Some(client)),
                changes,
                _stop: stop.drop_guard(),
            }),
        })
    }

    /// The command connection, reconnecting if it broke; held while used.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut client = self.inner.client.lock().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = Some(connect(&self.inner.config).await?);
        }
        Ok(client)
    }
}

fn record_from(row: &tokio_postgres::Row) -> Result<Record> {
    let revision: String = row.try_get(0).map_err(backend)?;
    let data: Vec<u8> = row.try_get(1).map_err(backend)?;
    let revision = revision
        .parse::<Revision>()
        .map_err(|e| malformed(format!("a stored revision is not a revision: {e}")))?;
    Ok(Record::new(revision, Bytes::from(data)))
}

impl Storage for PostgresStorage {
    async fn load(&self, topic: &Topic) -> Result<Option<Record>> {
        let guard = self.client().await?;
        let client = guard
            .as_ref()
            .ok_or_else(|| malformed("no connection".into()))?;
        let row = client
            .query_opt(
                "SELECT revision, data FROM statesync_topics WHERE topic = $1",
                &[&topic.as_str()],
            )
            .await
            .map_err(backend)?;
        row.as_ref().map(record_from).transpose()
    }

    async fn store(&self, topic: &Topic, record: &Record) -> Result<()> {
        let mut guard = self.client().await?;
        let client = guard
            .as_mut()
            .ok_or_else(|| malformed("no connection".into()))?;
        let transaction = client.transaction().await.map_err(backend)?;
        transaction
            .execute(
                "INSERT INTO statesync_topics (topic, revision, data) VALUES ($1, $2, $3)
                 ON CONFLICT (topic) DO UPDATE SET revision = $2, data = $3",
                &[
                    &topic.as_str(),
                    &record.revision.to_string(),
                    &&record.data[..],
                ],
            )
            .await
            .map_err(backend)?;
        notify(&transaction, topic, record.revision).await?;
        transaction.commit().await.map_err(backend)
    }

    async fn remove(&self, topic: &Topic) -> Result<()> {
        let guard = self.client().await?;
        let client = guard
            .as_ref()
            .ok_or_else(|| malformed("no connection".into()))?;
        client
            .execute(
                "DELETE FROM statesync_topics WHERE topic = $1",
                &[&topic.as_str()],
            )
            .await
            .map(drop)
            .map_err(backend)
    }

    async fn topics(&self) -> Result<Vec<Topic>> {
        let guard = self.client().await?;
        let client = guard
            .as_ref()
            .ok_or_else(|| malformed("no connection".into()))?;
        let rows = client
            .query("SELECT topic FROM statesync_topics ORDER BY topic", &[])
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .filter_map(|row| row.try_get::<_, String>(0).ok())
            .filter_map(|name| Topic::new(name).ok())
            .collect())
    }

    async fn store_if(
        &self,
        topic: &Topic,
        expected: Option<Revision>,
        record: &Record,
    ) -> Result<Stored> {
        let mut guard = self.client().await?;
        let client = guard
            .as_mut()
            .ok_or_else(|| malformed("no connection".into()))?;
        let transaction = client.transaction().await.map_err(backend)?;
        let revision = record.revision.to_string();
        let changed = match expected {
            None => transaction
                .execute(
                    "INSERT INTO statesync_topics (topic, revision, data) VALUES ($1, $2, $3)
                     ON CONFLICT (topic) DO NOTHING",
                    &[&topic.as_str(), &revision, &&record.data[..]],
                )
                .await
                .map_err(backend)?,
            Some(expected) => transaction
                .execute(
                    "UPDATE statesync_topics SET revision = $3, data = $4
                     WHERE topic = $1 AND revision = $2",
                    &[
                        &topic.as_str(),
                        &expected.to_string(),
                        &revision,
                        &&record.data[..],
                    ],
                )
                .await
                .map_err(backend)?,
        };
        if changed == 1 {
            notify(&transaction, topic, record.revision).await?;
            transaction.commit().await.map_err(backend)?;
            return Ok(Stored::Committed);
        }
        let current = transaction
            .query_opt(
                "SELECT revision, data FROM statesync_topics WHERE topic = $1",
                &[&topic.as_str()],
            )
            .await
            .map_err(backend)?;
        transaction.rollback().await.map_err(backend)?;
        Ok(Stored::Conflict(
            current.as_ref().map(record_from).transpose()?,
        ))
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.inner.changes.subscribe())
    }
}

/// Queues the change notification; PostgreSQL sends it at commit.
async fn notify(
    transaction: &tokio_postgres::Transaction<'_>,
    topic: &Topic,
    revision: Revision,
) -> Result<()> {
    transaction
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &Change::notice(topic, revision)],
        )
        .await
        .map(drop)
        .map_err(backend)
}

/// Opens a connection of its own that has run `LISTEN`; its notices'
/// payloads, until it ends.
fn listening(
    config: String,
) -> impl FnMut() -> futures::future::BoxFuture<
    'static,
    Result<futures::stream::BoxStream<'static, String>, tokio_postgres::Error>,
> {
    move || {
        let config = config.clone();
        Box::pin(async move {
            let (client, mut connection) = tokio_postgres::connect(&config, NoTls).await?;
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            // The connection must be driven while LISTEN runs.
            let statement = format!("LISTEN {CHANNEL}");
            {
                let listen = client.batch_execute(&statement);
                let mut listen = std::pin::pin!(listen);
                loop {
                    tokio::select! {
                        done = &mut listen => break done?,
                        message = messages.next() => match message {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(e),
                            None => break,
                        },
                    }
                }
            }
            // The client lives as long as the stream: dropping it would
            // close the connection.
            let notices = messages
                .filter_map(move |message| {
                    let _client = &client;
                    std::future::ready(match message {
                        Ok(AsyncMessage::Notification(note)) => {
                            Some(Some(note.payload().to_owned()))
                        }
                        Ok(_) => None,
                        Err(_) => Some(None),
                    })
                })
                // An error ends the stream.
                .take_while(|notice| std::future::ready(notice.is_some()))
                .filter_map(std::future::ready);
            Ok(Box::pin(notices) as futures::stream::BoxStream<'static, String>)
        })
    }
}
