//! Tauri v2 plugin: the app's Rust backend is the source of truth for
//! windows running `@statesync/core` + `@statesync/tauri`, unchanged.
//!
//! - Topics (typed `serde` state or raw JSON) live in a
//!   [`Hub`], persisted crash-safely under the app's
//!   data directory by default.
//! - Every committed change is an invalidation `{topic, revision,
//!   sourceId?}` (`sourceId`: the label of the window that wrote), delivered
//!   only to windows that may read the topic: as the event
//!   `state-sync:invalidation` (configurable) when every window may read it,
//!   and through the channels windows open with the `listen` command (see
//!   [`commands::listen`]) for topics limited to some windows.
//! - Command `get_snapshot` with `{topic}` returns `{revision, data}`, the
//!   shape `createTauriSnapshotProvider` expects; command `set` with
//!   `{topic, data, expectedRevision?}` writes (compare-and-set with
//!   `expectedRevision`) and returns `{revision}`, or rejects with
//!   `{code: "conflict", currentRevision}`.
//! - Permissions the Tauri way: reading is in `state-sync:default`, writing
//!   is opt-in (`state-sync:allow-set`), and the plugin configuration can
//!   limit each window to some topics.
//! - [`StateSyncExt`] lets Rust code read and write topics, with the same
//!   events.
//!
//! # Setup
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct Settings {
//!     theme: String,
//! }
//!
//! // In an app: `run(tauri::generate_context!())`.
//! fn run(context: tauri::Context<tauri::Wry>) {
//!     tauri::Builder::default()
//!         .plugin(
//!             tauri_plugin_state_sync::Builder::new()
//!                 .topic("settings", Settings::default)
//!                 .build(),
//!         )
//!         // For windows that invoke the un-prefixed `get_snapshot` (the
//!         // JavaScript quickstart's default), register the same commands
//!         // on the app too, guarded by the same permissions (see [`commands`]);
//!         // the app's own commands go in the same list:
//!         .invoke_handler(tauri_plugin_state_sync::app_commands![])
//!         .run(context)
//!         .expect("error while running tauri application");
//! }
//! ```
//!
//! # Configuration (`tauri.conf.json`)
//!
//! ```json
//! { "plugins": { "state-sync": { "windows": { "prefs": ["settings"], "*": ["cart", "ui:*"] } } } }
//! ```
//!
//! Without `windows`, every window may use every topic. With it, a window
//! uses the patterns under its label, or else under `"*"`, or none. A topic
//! that some window may not read is delivered only through `listen`
//! channels, never as a Tauri event (which every window could receive).

pub mod commands;
mod error;
mod listeners;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use state_sync::{InvalidationSink, Revision, Subscriber, Subscription, Topic};
use state_sync_hub::{Hub, HubTopic, TopicValue};
use state_sync_storage::FileStorage;
use tauri::plugin::TauriPlugin;
use tauri::webview::PageLoadEvent;
use tauri::{Manager, RunEvent, Runtime, WindowEvent};

pub use error::{Error, Result};
use listeners::Listeners;

/// The plugin's name: commands are `plugin:state-sync|…`, permissions
/// `state-sync:…`.
pub const PLUGIN_NAME: &str = "state-sync";

/// The invalidation event's default name, as in `@statesync/tauri`.
pub const DEFAULT_EVENT_NAME: &str = "state-sync:invalidation";

/// The plugin's `tauri.conf.json` section (optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Topic patterns per window label (`"*"` for the others).
    #[serde(default)]
    pub windows: HashMap<String, Vec<String>>,
}

impl Config {
    fn allows(&self, window: &str, topic: &Topic) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let Some(patterns) = self.windows.get(window).or_else(|| self.windows.get("*")) else {
            return false;
        };
        matches_any(patterns, topic)
    }

    /// Whether every window, whatever its label, may read `topic`: only
    /// then may it travel as a Tauri event.
    fn readable_by_every_window(&self, topic: &Topic) -> bool {
        self.windows.is_empty()
            || (self.windows.contains_key("*")
                && self.windows.values().all(|p| matches_any(p, topic)))
    }
}

fn matches_any(patterns: &[String], topic: &Topic) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.as_str().starts_with(prefix),
        None => p == topic.as_str(),
    })
}

/// The payload of the invalidation event: `{topic, revision, sourceId?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidationPayload {
    /// The topic.
    pub topic: Topic,
    /// Its new revision, as a canonical decimal string.
    pub revision: Revision,
    /// The label of the window that wrote, when a window did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
}

type Registration = Box<
    dyn FnOnce(Hub) -> Pin<Box<dyn Future<Output = Result<(), state_sync_hub::Error>> + Send>>
        + Send,
>;

enum StorageChoice {
    AppData,
    Dir(PathBuf),
    Memory,
}

/// Configures the plugin.
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    topics: Vec<Registration>,
    event_name: String,
    storage: StorageChoice,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("topics", &self.topics.len())
            .field("event_name", &self.event_name)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// No topics yet; file store under the app's data directory; the
    /// default event name.
    pub fn new() -> Self {
        Builder {
            topics: Vec::new(),
            event_name: DEFAULT_EVENT_NAME.to_owned(),
            storage: StorageChoice::AppData,
        }
    }

    /// Registers a typed topic, starting at `default()` when nothing is
    /// stored. Writes from windows must decode as `T`.
    pub fn topic<T: TopicValue>(
        mut self,
        name: impl Into<String>,
        default: impl FnOnce() -> T + Send + 'static,
    ) -> Self {
        let name = name.into();
        self.topics.push(Box::new(move |hub: Hub| {
            Box::pin(async move { hub.topic(name, default).await.map(drop) })
        }));
        self
    }

    /// Registers a raw JSON topic, starting at `default` when nothing is
    /// stored.
    pub fn json_topic(self, name: impl Into<String>, default: Value) -> Self {
        self.topic(name, move || default)
    }

    /// The invalidation event's name (default `state-sync:invalidation`).
    pub fn event_name(mut self, name: impl Into<String>) -> Self {
        self.event_name = name.into();
        self
    }

    /// Stores topics under `dir` instead of the app's data directory.
    pub fn storage_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.storage = StorageChoice::Dir(dir.into());
        self
    }

    /// Keeps topics in memory only (tests, throwaway state).
    pub fn in_memory(mut self) -> Self {
        self.storage = StorageChoice::Memory;
        self
    }

    /// The plugin.
    pub fn build<R: Runtime>(self) -> TauriPlugin<R, Option<Config>> {
        let Builder {
            topics,
            event_name,
            storage,
        } = self;
        tauri::plugin::Builder::<R, Option<Config>>::new(PLUGIN_NAME)
            .invoke_handler(tauri::generate_handler![
                commands::get_snapshot,
                commands::set,
                commands::listen,
                commands::unlisten
            ])
            .setup(move |app, api| {
                let hub = match storage {
                    StorageChoice::Memory => Hub::in_memory(),
                    StorageChoice::Dir(dir) => Hub::new(FileStorage::open(dir)?),
                    StorageChoice::AppData => Hub::new(FileStorage::open(
                        app.path().app_data_dir()?.join("state-sync"),
                    )?),
                };
                tauri::async_runtime::block_on(async {
                    for register in topics {
                        register(hub.clone()).await?;
                    }
                    hub.open_stored_topics().await
                })?;
                let config = api.config().clone().unwrap_or_default();
                let state = StateSync {
                    hub,
                    listeners: Arc::new(Listeners::new(app.clone(), config, event_name)),
                    emitters: Mutex::new(Emitters::default()),
                };
                for topic in state.hub.topics() {
                    tauri::async_runtime::block_on(state.emit_changes(&topic))?;
                }
                app.manage(state);
                Ok(())
            })
            .on_page_load(|webview, payload| {
                // A reloaded page has lost its channels' callbacks.
                if payload.event() == PageLoadEvent::Started
                    && let Some(state) = webview.try_state::<StateSync<R>>()
                {
                    state.listeners.forget_window(webview.window().label());
                }
            })
            .on_event(|app, event| {
                let Some(state) = app.try_state::<StateSync<R>>() else {
                    return;
                };
                match event {
                    RunEvent::WindowEvent {
                        label,
                        event: WindowEvent::Destroyed,
                        ..
                    } => state.listeners.forget_window(label),
                    // Every acknowledged write is stored; wait for queued ones.
                    RunEvent::Exit => tauri::async_runtime::block_on(state.hub.close()),
                    _ => {}
                }
            })
            .build()
    }
}

/// An app `invoke_handler` with the plugin's commands as app commands, so
/// windows can invoke the un-prefixed `get_snapshot` and `set` (the names
/// the JavaScript packages default to), guarded by the plugin's
/// permissions (see [`commands`]). The app's own commands go in the
/// brackets.
///
/// ```no_run
/// #[tauri::command]
/// fn greet(name: String) -> String {
///     format!("hello {name}")
/// }
///
/// fn run(context: tauri::Context<tauri::Wry>) {
///     tauri::Builder::default()
///         .plugin(tauri_plugin_state_sync::Builder::new().build())
///         .invoke_handler(tauri_plugin_state_sync::app_commands![greet])
///         .run(context)
///         .expect("error while running tauri application");
/// }
/// ```
#[macro_export]
macro_rules! app_commands {
    ($($command:path),* $(,)?) => {
        ::tauri::generate_handler![$($command,)* $crate::commands::get_snapshot, $crate::commands::set]
    };
}

#[derive(Default)]
struct Emitters {
    topics: HashSet<Topic>,
    subscriptions: Vec<Subscription>,
}

/// The plugin's state: the hub and its event emitters. Reach it with
/// [`StateSyncExt::state_sync`].
pub struct StateSync<R: Runtime> {
    hub: Hub,
    listeners: Arc<Listeners<R>>,
    emitters: Mutex<Emitters>,
}

impl<R: Runtime> std::fmt::Debug for StateSync<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSync")
            .field("hub", &self.hub)
            .field("channels", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> StateSync<R> {
    /// The hub holding the topics.
    #[must_use]
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Opens (or registers) a typed topic; its changes emit events like
    /// every other topic's.
    ///
    /// # Errors
    ///
    /// As [`Hub::topic`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: as `Hub::topic`; nothing is written.
    pub async fn topic<T: TopicValue>(
        &self,
        name: impl AsRef<str>,
        default: impl FnOnce() -> T,
    ) -> Result<HubTopic<T>> {
        let topic = self.hub.topic(name, default).await?;
        self.emit_changes(topic.topic()).await?;
        Ok(topic)
    }

    /// Whether the window `label` may use `topic`.
    #[must_use]
    pub fn window_may_access(&self, label: &str, topic: &Topic) -> bool {
        self.listeners.config().allows(label, topic)
    }

    /// Opens a channel for `window`, as the `listen` command does: it
    /// receives the invalidations of every topic the window may read.
    /// Returns the id to close it with [`unlisten`](Self::unlisten).
    pub fn listen(&self, window: &str, channel: tauri::ipc::Channel<InvalidationPayload>) -> u32 {
        self.listeners.listen(window, channel)
    }

    /// Closes `window`'s channel `id`; whether it was open.
    pub fn unlisten(&self, window: &str, id: u32) -> bool {
        self.listeners.unlisten(window, id)
    }

    /// Emits the invalidation event for every change of `topic`, once.
    async fn emit_changes(&self, topic: &Topic) -> Result<()> {
        if !lock(&self.emitters).topics.insert(topic.clone()) {
            return Ok(());
        }
        let listeners = self.listeners.clone();
        let sink = InvalidationSink::from_fn(topic.clone(), move |event| {
            listeners.deliver(&InvalidationPayload {
                topic: event.topic.clone(),
                revision: event.revision,
                source_id: event.source_id.clone(),
            });
        });
        let subscription = self.hub.subscribe(topic, sink).await.map_err(|_| {
            state_sync_hub::Error::UnknownTopic {
                topic: topic.clone(),
            }
        })?;
        lock(&self.emitters).subscriptions.push(subscription);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Access to the plugin from any [`Manager`] (app, app handle, window).
pub trait StateSyncExt<R: Runtime> {
    /// The plugin's state.
    ///
    /// # Panics
    ///
    /// If the plugin is not registered.
    fn state_sync(&self) -> &StateSync<R>;
}

impl<R: Runtime, M: Manager<R>> StateSyncExt<R> for M {
    fn state_sync(&self) -> &StateSync<R> {
        self.state::<StateSync<R>>().inner()
    }
}
