//! The plugin's commands, as `@statesync/tauri` invokes them.

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use state_sync::{Revision, Topic};
use tauri::{Runtime, State, Window};

use crate::{Error, Result, StateSync};

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
#[tauri::command]
pub async fn get_snapshot<R: Runtime>(
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    topic: String,
) -> Result<SnapshotResponse> {
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
#[tauri::command]
pub async fn set<R: Runtime>(
    window: Window<R>,
    state: State<'_, StateSync<R>>,
    topic: String,
    data: Value,
    expected_revision: Option<String>,
) -> Result<SetResponse> {
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
