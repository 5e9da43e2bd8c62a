//! `statesync serve --config FILE`: every server setting in one TOML file.
//!
//! Tables: `[store]` (data directory, fsync, or a shared engine), `[listen]`
//! (socket, WebSocket, named local socket), `[access]` (token, rules),
//! `[hub]` (topics, probes, batching) and `[server]`
//! ([`ServerConfig`]: limits and timeouts). Every key is optional and takes
//! the default of the matching flag; an unknown key is an error naming it.
//! Relative paths are relative to the file's directory. A flag (or its
//! environment variable) overrides the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use state_sync_hub::HubBuilder;
use state_sync_net::{ClientAccess, ServerConfig};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ServeConfig {
    pub(crate) store: StoreConfig,
    pub(crate) listen: ListenConfig,
    pub(crate) access: AccessSection,
    pub(crate) hub: HubConfig,
    pub(crate) server: ServerConfig,
}

/// `[store]`: where the topics are kept.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StoreConfig {
    /// `--data-dir`.
    pub(crate) data_dir: Option<PathBuf>,
    /// `false` is `--no-fsync`.
    pub(crate) fsync: Option<bool>,
    /// `--redis`.
    pub(crate) redis: Option<String>,
    /// `--postgres`.
    pub(crate) postgres: Option<String>,
}

/// `[listen]`: where clients connect.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ListenConfig {
    /// `--socket`.
    pub(crate) socket: Option<PathBuf>,
    /// `--ws`.
    pub(crate) websocket: Option<String>,
    /// `--local`.
    pub(crate) local: Option<String>,
    /// `--metrics`.
    pub(crate) metrics: Option<String>,
}

/// `[access]`: who may do what.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct AccessSection {
    /// `--token`: full access.
    pub(crate) token: Option<String>,
    /// `--token-file`.
    pub(crate) token_file: Option<PathBuf>,
    /// `--access`: a file of `[[clients]]`.
    pub(crate) file: Option<PathBuf>,
    /// `[[access.clients]]`, in the format of the access file.
    pub(crate) clients: Vec<ClientAccess>,
}

/// `[hub]`: the hub's own settings (see [`HubBuilder`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HubConfig {
    /// [`HubBuilder::max_topics`].
    pub(crate) max_topics: Option<usize>,
    /// [`HubBuilder::probe_interval`].
    #[serde(with = "humantime_serde")]
    pub(crate) probe_interval: Option<Duration>,
    /// [`HubBuilder::group_commit`].
    pub(crate) group_commit: Option<bool>,
    /// [`HubBuilder::queue_capacity`].
    pub(crate) queue_capacity: Option<usize>,
}

impl HubConfig {
    /// Applies the settings that are given.
    pub(crate) fn apply(&self, mut builder: HubBuilder) -> HubBuilder {
        if let Some(max) = self.max_topics {
            builder = builder.max_topics(max);
        }
        if let Some(every) = self.probe_interval {
            builder = builder.probe_interval(every);
        }
        if let Some(on) = self.group_commit {
            builder = builder.group_commit(on);
        }
        if let Some(capacity) = self.queue_capacity {
            builder = builder.queue_capacity(capacity);
        }
        builder
    }
}

impl ServeConfig {
    /// Reads and checks `path`; relative paths in it become relative to
    /// its directory.
    ///
    /// # Errors
    ///
    /// The file cannot be read, is not TOML, has an unknown key or a value
    /// of the wrong type; the message names the file, line and key.
    pub(crate) fn read(path: &Path) -> Result<ServeConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut config: ServeConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for relative in [
            &mut config.store.data_dir,
            &mut config.listen.socket,
            &mut config.access.token_file,
            &mut config.access.file,
        ]
        .into_iter()
        .flatten()
        {
            if relative.is_relative() {
                *relative = base.join(&*relative);
            }
        }
        Ok(config)
    }

    /// Whether the file holds a secret: a token, access rules, or an engine
    /// URL with a password.
    pub(crate) fn holds_secrets(&self) -> bool {
        let with_password = |url: &Option<String>| {
            url.as_deref().is_some_and(|url| {
                url.split_once("://")
                    .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
                    || url.contains("password=")
            })
        };
        self.access.token.is_some()
            || !self.access.clients.is_empty()
            || with_password(&self.store.redis)
            || with_password(&self.store.postgres)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("statesync.toml");
        std::fs::write(&path, text).unwrap();
        ServeConfig::read(&path)
    }

    #[test]
    fn every_table_is_read_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("statesync.toml");
        std::fs::write(
            &path,
            r#"
            [store]
            data_dir = "state"
            fsync = false
            [listen]
            socket = "/run/hub.sock"
            websocket = "127.0.0.1:0"
            [access]
            token_file = "token"
            [[access.clients]]
            token = "reader"
            read = ["settings"]
            [hub]
            max_topics = 5
            probe_interval = "2s"
            [server]
            max_connections = 10
            write_timeout = "250ms"
            "#,
        )
        .unwrap();
        let config = ServeConfig::read(&path).unwrap();
        assert_eq!(config.store.data_dir, Some(dir.path().join("state")));
        assert_eq!(config.store.fsync, Some(false));
        assert_eq!(config.listen.socket, Some(PathBuf::from("/run/hub.sock")));
        assert_eq!(config.access.token_file, Some(dir.path().join("token")));
        assert_eq!(config.access.clients.len(), 1);
        assert_eq!(config.hub.probe_interval, Some(Duration::from_secs(2)));
        assert_eq!(config.server.max_connections, 10);
        assert_eq!(config.server.write_timeout, Duration::from_millis(250));
        assert_eq!(
            config.server.idle_timeout,
            ServerConfig::default().idle_timeout
        );
        assert!(config.holds_secrets());
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let error = parse("[server]\nmax_conections = 3\n").unwrap_err();
        assert!(error.contains("max_conections"), "{error}");
        let error = parse("[listen]\nws = \"127.0.0.1:0\"\n").unwrap_err();
        assert!(error.contains("`ws`"), "{error}");
        let error = parse("[storage]\n").unwrap_err();
        assert!(error.contains("storage"), "{error}");
        let error = parse("[server]\nidle_timeout = \"soon\"\n").unwrap_err();
        assert!(error.contains("idle_timeout"), "{error}");
    }

    #[test]
    fn engine_urls_with_passwords_count_as_secrets() {
        let plain = parse("[store]\nredis = \"redis://127.0.0.1:6379/0\"\n").unwrap();
        assert!(!plain.holds_secrets());
        let secret = parse("[store]\nredis = \"redis://:pw@127.0.0.1:6379\"\n").unwrap();
        assert!(secret.holds_secrets());
        let secret = parse("[store]\npostgres = \"host=db password=pw\"\n").unwrap();
        assert!(secret.holds_secrets());
    }

    #[test]
    fn the_documented_file_parses_and_its_defaults_are_the_real_ones() {
        let doc = include_str!("../../../docs/CONFIG.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let config = parse(&doc[start..end]).unwrap();
        assert_eq!(
            format!("{:?}", config.server),
            format!("{:?}", ServerConfig::default())
        );
        assert_eq!(config.hub.max_topics, Some(10_000));
        assert_eq!(config.hub.probe_interval, Some(Duration::from_secs(30)));
        assert_eq!(config.store.fsync, Some(true));
    }
}
