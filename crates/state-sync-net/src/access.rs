//! Who may connect, and which topics each token may read and write.

use serde::Deserialize;
use state_sync::Topic;
use subtle::ConstantTimeEq;

/// Access rules: tokens and their per-topic permissions.
///
/// With no client entries, access is open: no token is needed and every
/// topic may be read and written (for a socket only its owner can reach).
///
/// # Configuration file
///
/// ```toml
/// # Readers see everything; the settings app may also write `settings*`.
/// [[clients]]
/// name = "viewer"
/// token = "read-only-secret"
/// read = ["*"]
///
/// [[clients]]
/// name = "settings-app"
/// token = "another-secret"
/// read = ["*"]
/// write = ["settings", "settings:*"]
/// ```
///
/// A pattern is a topic name, or a prefix followed by `*`.
///
/// ```
/// use state_sync_net::AccessConfig;
///
/// let access = AccessConfig::from_toml(r#"
///     [[clients]]
///     token = "s3cret"
///     read = ["*"]
///     write = ["settings"]
/// "#)?;
/// let grant = access.authenticate(Some("s3cret")).unwrap();
/// assert!(grant.can_write(&state_sync::Topic::new("settings")?));
/// assert!(!grant.can_write(&state_sync::Topic::new("other")?));
/// assert!(access.authenticate(Some("wrong")).is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    clients: Vec<ClientAccess>,
}

/// One token and what it may do.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAccess {
    /// A name for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// The secret the client presents in `hello`.
    pub token: String,
    /// Topic patterns it may read (get, subscribe).
    #[serde(default)]
    pub read: Vec<String>,
    /// Topic patterns it may write (set).
    #[serde(default)]
    pub write: Vec<String>,
}

impl std::fmt::Debug for ClientAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAccess")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("read", &self.read)
            .field("write", &self.write)
            .finish()
    }
}

/// The access config file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid access configuration: {0}")]
pub struct AccessConfigError(#[from] toml::de::Error);

/// What an authenticated connection may do.
#[derive(Debug, Clone)]
pub struct Grant {
    name: Option<String>,
    read: Vec<String>,
    write: Vec<String>,
}

impl AccessConfig {
    /// Open access: no token, every topic readable and writable.
    #[must_use]
    pub fn open() -> Self {
        AccessConfig::default()
    }

    /// Rules from TOML (see the type's documentation).
    ///
    /// # Errors
    ///
    /// Malformed TOML, unknown keys, a client without a token.
    pub fn from_toml(text: &str) -> Result<Self, AccessConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Adds a client.
    #[must_use]
    pub fn with_client(mut self, client: ClientAccess) -> Self {
        self.clients.push(client);
        self
    }

    /// Whether a token is needed.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    /// The grant for `token`, or `None` when it matches no client. Every
    /// configured token is compared, in constant time, whatever matches.
    #[must_use]
    pub fn authenticate(&self, token: Option<&str>) -> Option<Grant> {
        if self.is_open() {
            return Some(Grant {
                name: None,
                read: vec!["*".into()],
                write: vec!["*".into()],
            });
        }
        let presented = token.unwrap_or_default().as_bytes();
        let mut found = None;
        for client in &self.clients {
            let equal: bool = client.token.as_bytes().ct_eq(presented).into();
            if equal && found.is_none() {
                found = Some(client);
            }
        }
        found.map(|c| Grant {
            name: c.name.clone(),
            read: c.read.clone(),
            write: c.write.clone(),
        })
    }
}

impl ClientAccess {
    /// A client with `token`, reading and writing nothing yet.
    pub fn new(token: impl Into<String>) -> Self {
        ClientAccess {
            name: None,
            token: token.into(),
            read: Vec::new(),
            write: Vec::new(),
        }
    }

    /// Adds a readable topic pattern.
    #[must_use]
    pub fn read(mut self, pattern: impl Into<String>) -> Self {
        self.read.push(pattern.into());
        self
    }

    /// Adds a writable topic pattern.
    #[must_use]
    pub fn write(mut self, pattern: impl Into<String>) -> Self {
        self.write.push(pattern.into());
        self
    }
}

impl Grant {
    /// The client's configured name.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether `topic` may be read.
    #[must_use]
    pub fn can_read(&self, topic: &Topic) -> bool {
        matches_any(&self.read, topic)
    }

    /// Whether `topic` may be written.
    #[must_use]
    pub fn can_write(&self, topic: &Topic) -> bool {
        matches_any(&self.write, topic)
    }
}

fn matches_any(patterns: &[String], topic: &Topic) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.as_str().starts_with(prefix),
        None => p == topic.as_str(),
    })
}
