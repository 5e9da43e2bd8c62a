//! The plugin's commands, as `@statesync/tauri` invokes them.
//!
//! # Permissions
//!
//! Each command runs only where the window's capabilities grant the
//! plugin's permission for it (`state-sync:allow-get-snapshot`,
//! `state-sync:allow-set`, …), whether it was invoked as
//! `plugin:state-sync|get_snapshot` or, registered on the app with
//! [`app_commands!`](crate::app_commands), as the un-prefixed
//! `get_snapshot`. Tauri checks capabilities only for plugin commands and
//! for app commands the app itself declared, so every command also checks
//! them itself: a refusal of an un-prefixed command is
//! `{code: "not_allowed", message}`. (A refusal by Tauri, for a prefixed
//! one, is a plain string: see the plugin README.)
//!
//! The app's own commands compose with these: list them in
//! `app_commands![my_command, …]`, or name these in the app's own
//! `generate_handler!`:
//!
//! ```no_run
//! #[tauri::command]
//! fn greet() -> String {
//!     "hello".into()
//! }
//!
//! fn run(context: tauri::Context<tauri::Wry>) {
//!     tauri::Builder::default()
//!         .plugin(tauri_plugin_state_sync::Builder::new().build())
//!         .invoke_handler(tauri::generate_handler![
//!             greet,
//!             tauri_plugin_state_sync::commands::get_snapshot,
//!             tauri_plugin_state_sync::commands::set,
//!         ])
//!         .run(context)
//!         .expect("error while running tauri application");
//! }
//! ```

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use state_sync::{Revision, Topic};
use tauri::ipc::Channel;
use tauri::{Runtime, State, Webview, Window};

use crate::{Error, InvalidationPayload, Result, StateSync};

/// `{revision, data}`: the revision as a canonical string, the data as the
/// hub's shared JSON encoding (copied, never re-serialized).
#[derive(Debug, Serialize)]
pub struct SnapshotResponse {
    revision: Revision,
    data: Box<RawValue>,
}

/// `{revision}` of a committed write.
#[derive(Debug, Serialize)]
pub struct SetResponse {
    revision: Revision,
}

/// Refuses unless the webview's capabilities grant the plugin's permission
/// for `command`.
fn require_permission<R: Runtime>(webview: &Webview<R>, command: &'static str) -> Result<()> {
    match webview.resolve_command_scope::<Value>(crate::PLUGIN_NAME, command)? {
        Some(_) => Ok(()),
        None => Err(Error::NotAllowed {
            command,
            window: webview.label().to_owned(),
        }),
    }
}

fn allowed<R: Runtime>(state: &StateSync<R>, window: &Window<R>, topic: &str) -> Result<Topic> {
    let topic = Topic::new(topic).map_err(state_sync_hub::Error::from)?;
    if !state.window_may_access(window.label(), &topic) {
        return Err(Error::Forbidden {
            window: window.label().to_owned(),
            topic: topic.as_str().to_owned(),
        });
    }
    Ok(topic)
}

/// Returns the topic's snapshot `{revision, data}`.
///
/// # Cancel safety
///
/// Cancel safe: it only reads.
#[tauri::command]
pub async fn get_snapshot<R: Runtime>(
    webview: Webview<R>,
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    topic: String,
) -> Result<SnapshotResponse> {
    require_permission(&webview, "get_snapshot")?;
    let topic = allowed(&state, &window, &topic)?;
    let snapshot = state.hub().get_json(&topic)?;
    let json = String::from_utf8_lossy(&snapshot.data).into_owned();
    let data = RawValue::from_string(json).map_err(|e| {
        Error::Hub(state_sync_hub::Error::Encode {
            topic: topic.clone(),
            source: std::sync::Arc::new(e),
        })
    })?;
    Ok(SnapshotResponse {
        revision: snapshot.revision,
        data,
    })
}

/// Writes the topic; with `expectedRevision`, only if it is still at that
/// revision. The invalidation carries the window's label as `sourceId`.
///
/// # Cancel safety
///
/// Tauri runs a command to completion; if its future is dropped anyway, a
/// write already handed to the hub is still committed.
#[tauri::command]
pub async fn set<R: Runtime>(
    webview: Webview<R>,
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    topic: String,
    data: Value,
    expected_revision: Option<String>,
) -> Result<SetResponse> {
    require_permission(&webview, "set")?;
    let topic = allowed(&state, &window, &topic)?;
    let expected = expected_revision
        .map(|r| r.parse::<Revision>().map_err(|_| Error::InvalidRevision(r)))
        .transpose()?;
    let bytes = serde_json::to_vec(&data).map_err(|e| {
        Error::Hub(state_sync_hub::Error::Encode {
            topic: topic.clone(),
            source: std::sync::Arc::new(e),
        })
    })?;
    let revision = state
        .hub()
        .set_json(&topic, &bytes, expected, Some(window.label().to_owned()))
        .await?;
    Ok(SetResponse { revision })
}

/// Opens a channel that receives the invalidations of every topic this
/// window may read, `{topic, revision, sourceId?}` each; returns its id.
/// The way to follow topics that some windows may not read: those are
/// never emitted as Tauri events, which every window could receive. The
/// channel closes with the window or when its page reloads.
///
/// # Cancel safety
///
/// Cancel safe: the channel is registered or not.
#[tauri::command]
pub async fn listen<R: Runtime>(
    webview: Webview<R>,
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    on_event: Channel<InvalidationPayload>,
) -> Result<u32> {
    require_permission(&webview, "listen")?;
    Ok(state.listen(window.label(), on_event))
}

/// Closes a channel opened by [`listen`] in this window; `false` if there
/// was none with that id.
///
/// # Cancel safety
///
/// Cancel safe.
#[tauri::command]
pub async fn unlisten<R: Runtime>(
    webview: Webview<R>,
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    id: u32,
) -> Result<bool> {
    require_permission(&webview, "unlisten")?;
    Ok(state.unlisten(window.label(), id))
}
