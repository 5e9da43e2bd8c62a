//! The [`Applier`] role and ready-made appliers for common state holders.
//!
//! | state holder | applier |
//! |---|---|
//! | a closure | [`from_fn`], [`from_async_fn`] |
//! | `tokio::sync::watch::Sender<T>` | the sender itself |
//! | `Arc<std::sync::RwLock<T>>` | the `Arc` itself |
//! | `Arc<arc_swap::ArcSwap<T>>` | the `Arc` itself (feature `arc-swap`) |
//! | a JSON object (`serde_json::Map`) | [`JsonObjectApplier`] |

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::error::BoxError;
use crate::protocol::SnapshotEnvelope;

/// Writes a snapshot into local state.
///
/// The engine calls `apply` only with snapshots that pass the revision gate,
/// one at a time, and never while holding a lock: an applier may cause a new
/// invalidation for its own handle while it runs.
pub trait Applier<T>: Send + Sync + 'static {
    /// Applies `snapshot`.
    ///
    /// # Errors
    ///
    /// Any error is reported in the `apply` phase; the local revision stays
    /// where it was, so the next invalidation tries again.
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Applies `snapshot` at once, when this applier never waits (the
    /// ready-made ones here, except [`from_async_fn`]). The engine then
    /// refreshes without building a future, which halves what a refresh
    /// costs (with [`Provider::fetch_now`](crate::Provider::fetch_now)).
    ///
    /// The default hands the snapshot back untouched, as
    /// [`AppliedNow::Later`], for [`apply`](Self::apply). Whatever this
    /// returns must be what `apply` would do: the engine gates, orders,
    /// reports and counts both alike, and calls this only in turn, never
    /// after `stop` returned.
    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        AppliedNow::Later(snapshot)
    }
}

/// What [`Applier::apply_now`] did with a snapshot.
#[derive(Debug)]
pub enum AppliedNow<T> {
    /// Applied, or failed to, without waiting.
    Done(Result<(), BoxError>),
    /// Not applied: this applier waits. The snapshot, untouched, for
    /// [`Applier::apply`].
    Later(SnapshotEnvelope<T>),
}

/// An applier from a synchronous closure.
///
/// # Examples
///
/// ```
/// use state_sync::applier;
///
/// let applier = applier::from_fn(|snapshot: state_sync::SnapshotEnvelope<String>| {
///     println!("revision {}: {}", snapshot.revision, snapshot.data);
///     Ok::<_, std::convert::Infallible>(())
/// });
/// # let _ = applier;
/// ```
pub fn from_fn<T, E, F>(f: F) -> FnApplier<F>
where
    F: Fn(SnapshotEnvelope<T>) -> Result<(), E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    FnApplier(f)
}

/// An applier from an asynchronous closure.
pub fn from_async_fn<T, E, F, Fut>(f: F) -> AsyncFnApplier<F>
where
    F: Fn(SnapshotEnvelope<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<BoxError>,
{
    AsyncFnApplier(f)
}

/// See [`from_fn`].
#[derive(Clone)]
pub struct FnApplier<F>(F);

/// See [`from_async_fn`].
#[derive(Clone)]
pub struct AsyncFnApplier<F>(F);

impl<F> fmt::Debug for FnApplier<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnApplier")
    }
}

impl<F> fmt::Debug for AsyncFnApplier<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AsyncFnApplier")
    }
}

impl<T, E, F> Applier<T> for FnApplier<F>
where
    T: Send + 'static,
    F: Fn(SnapshotEnvelope<T>) -> Result<(), E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        std::future::ready((self.0)(snapshot).map_err(Into::into))
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        AppliedNow::Done((self.0)(snapshot).map_err(Into::into))
    }
}

impl<T, E, F, Fut> Applier<T> for AsyncFnApplier<F>
where
    T: Send + 'static,
    F: Fn(SnapshotEnvelope<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<BoxError>,
{
    async fn apply(&self, snapshot: SnapshotEnvelope<T>) -> Result<(), BoxError> {
        (self.0)(snapshot).await.map_err(Into::into)
    }
}

/// Sends the data to every `watch::Receiver`; receivers see only the latest.
impl<T: Send + Sync + 'static> Applier<T> for tokio::sync::watch::Sender<T> {
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.send_replace(snapshot.data);
        std::future::ready(Ok(()))
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        self.send_replace(snapshot.data);
        AppliedNow::Done(Ok(()))
    }
}

/// Replaces the value under a write lock held only for the assignment.
impl<T: Send + Sync + 'static> Applier<T> for Arc<RwLock<T>> {
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        std::future::ready(replace_locked(self, snapshot.data))
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        AppliedNow::Done(replace_locked(self, snapshot.data))
    }
}

fn replace_locked<T>(lock: &RwLock<T>, data: T) -> Result<(), BoxError> {
    // A poisoned lock only means another writer panicked; the value is
    // replaced wholesale, so it is safe to recover.
    let mut guard = lock
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *guard = data;
    Ok(())
}

/// Stores the value; readers keep lock-free access to the previous one until
/// they load again.
#[cfg(feature = "arc-swap")]
impl<T: Send + Sync + 'static> Applier<T> for Arc<arc_swap::ArcSwap<T>> {
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.store(Arc::new(snapshot.data));
        std::future::ready(Ok(()))
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        self.store(Arc::new(snapshot.data));
        AppliedNow::Done(Ok(()))
    }
}

/// How [`JsonObjectApplier`] merges the new state into the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApplyMode {
    /// Set every top-level key of the new state; keep the others (default).
    #[default]
    Patch,
    /// Also delete top-level keys that are not in the new state.
    Replace,
}

type ToState = Arc<dyn Fn(Value) -> Value + Send + Sync>;

/// Applies JSON snapshots to a shared JSON object, with the semantics of the
/// original library's store adapters.
///
/// - [`ApplyMode::Patch`] (default) merges top-level keys;
///   [`ApplyMode::Replace`] also deletes keys missing from the new state.
/// - [`pick_keys`](Self::pick_keys) / [`omit_keys`](Self::omit_keys) limit
///   which top-level keys the applier may touch, protecting local-only fields.
/// - [`to_state`](Self::to_state) maps the snapshot data first.
/// - [`strict`](Self::strict) (default on): data that is not an object is an
///   `apply` error; off, such a snapshot is skipped.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, RwLock};
/// use serde_json::{json, Map};
/// use state_sync::applier::{ApplyMode, JsonObjectApplier};
/// use state_sync::{Applier, Revision, SnapshotEnvelope};
///
/// # tokio_test_block_on(async {
/// let state = Arc::new(RwLock::new(Map::new()));
/// state.write().unwrap().insert("window_size".into(), json!([800, 600])); // local only
///
/// let applier = JsonObjectApplier::new(state.clone())
///     .mode(ApplyMode::Replace)
///     .omit_keys(["window_size"]);
/// applier
///     .apply(SnapshotEnvelope::new(Revision::new(1), json!({"theme": "dark"})))
///     .await
///     .unwrap();
///
/// let state = state.read().unwrap();
/// assert_eq!(state["theme"], "dark");
/// assert_eq!(state["window_size"], json!([800, 600]));
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct JsonObjectApplier {
    target: Arc<RwLock<Map<String, Value>>>,
    mode: ApplyMode,
    pick: Option<HashSet<String>>,
    omit: HashSet<String>,
    to_state: Option<ToState>,
    strict: bool,
}

/// The snapshot data (after `to_state`) is not a JSON object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("snapshot data is {found}, not a JSON object")]
pub struct NotAnObject {
    found: &'static str,
}

impl JsonObjectApplier {
    /// Applies into `target` in patch mode, strict, touching every key.
    #[must_use]
    pub fn new(target: Arc<RwLock<Map<String, Value>>>) -> Self {
        JsonObjectApplier {
            target,
            mode: ApplyMode::Patch,
            pick: None,
            omit: HashSet::new(),
            to_state: None,
            strict: true,
        }
    }

    /// Patch or replace.
    #[must_use]
    pub fn mode(mut self, mode: ApplyMode) -> Self {
        self.mode = mode;
        self
    }

    /// Touch only these top-level keys.
    #[must_use]
    pub fn pick_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.pick = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Never touch these top-level keys.
    #[must_use]
    pub fn omit_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.omit = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Maps snapshot data to the object to apply.
    #[must_use]
    pub fn to_state(mut self, f: impl Fn(Value) -> Value + Send + Sync + 'static) -> Self {
        self.to_state = Some(Arc::new(f));
        self
    }

    /// Whether a non-object state is an error (`true`, default) or skipped.
    #[must_use]
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    fn allows(&self, key: &str) -> bool {
        self.pick.as_ref().is_none_or(|p| p.contains(key)) && !self.omit.contains(key)
    }

    fn merge(&self, data: Value) -> Result<(), BoxError> {
        let state = match &self.to_state {
            Some(f) => f(data),
            None => data,
        };
        let Value::Object(incoming) = state else {
            if self.strict {
                return Err(NotAnObject {
                    found: crate::revision::json_type_name(&state),
                }
                .into());
            }
            tracing::debug!("non-object snapshot skipped (strict off)");
            return Ok(());
        };
        let mut target = self
            .target
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.mode == ApplyMode::Replace {
            target.retain(|k, _| !self.allows(k) || incoming.contains_key(k));
        }
        for (k, v) in incoming {
            if self.allows(&k) {
                target.insert(k, v);
            }
        }
        Ok(())
    }
}

impl Applier<Value> for JsonObjectApplier {
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<Value>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        std::future::ready(self.merge(snapshot.data))
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<Value>) -> AppliedNow<Value> {
        AppliedNow::Done(self.merge(snapshot.data))
    }
}

impl fmt::Debug for JsonObjectApplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonObjectApplier")
            .field("mode", &self.mode)
            .field("pick", &self.pick)
            .field("omit", &self.omit)
            .field("to_state", &self.to_state.is_some())
            .field("strict", &self.strict)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Revision;
    use serde_json::json;

    fn obj(v: Value) -> Arc<RwLock<Map<String, Value>>> {
        match v {
            Value::Object(m) => Arc::new(RwLock::new(m)),
            _ => unreachable!(),
        }
    }

    fn snap(v: Value) -> SnapshotEnvelope<Value> {
        SnapshotEnvelope::new(Revision::new(1), v)
    }

    fn read(t: &Arc<RwLock<Map<String, Value>>>) -> Value {
        Value::Object(t.read().unwrap().clone())
    }

    #[tokio::test]
    async fn patch_merges_and_replace_deletes_missing_keys() {
        let t = obj(json!({"a": 1, "b": 2}));
        JsonObjectApplier::new(t.clone())
            .apply(snap(json!({"b": 3, "c": 4})))
            .await
            .unwrap();
        assert_eq!(read(&t), json!({"a": 1, "b": 3, "c": 4}));
        JsonObjectApplier::new(t.clone())
            .mode(ApplyMode::Replace)
            .apply(snap(json!({"c": 5})))
            .await
            .unwrap();
        assert_eq!(read(&t), json!({"c": 5}));
    }

    #[tokio::test]
    async fn pick_and_omit_protect_local_keys_even_in_replace_mode() {
        let t = obj(json!({"local": true, "theme": "light", "lang": "en"}));
        JsonObjectApplier::new(t.clone())
            .mode(ApplyMode::Replace)
            .pick_keys(["theme", "lang"])
            .apply(snap(json!({"theme": "dark", "local": false})))
            .await
            .unwrap();
        assert_eq!(read(&t), json!({"local": true, "theme": "dark"}));

        JsonObjectApplier::new(t.clone())
            .mode(ApplyMode::Replace)
            .omit_keys(["local"])
            .apply(snap(json!({"lang": "fr"})))
            .await
            .unwrap();
        assert_eq!(read(&t), json!({"local": true, "lang": "fr"}));
    }

    #[tokio::test]
    async fn to_state_maps_and_strict_rejects_non_objects() {
        let t = obj(json!({}));
        let a = JsonObjectApplier::new(t.clone()).to_state(|v| v["inner"].clone());
        a.apply(snap(json!({"inner": {"x": 1}}))).await.unwrap();
        assert_eq!(read(&t), json!({"x": 1}));
        let err = a.apply(snap(json!({"inner": 5}))).await.unwrap_err();
        assert!(err.to_string().contains("a number"), "{err}");
        a.clone()
            .strict(false)
            .apply(snap(json!({"inner": [1]})))
            .await
            .unwrap();
        assert_eq!(read(&t), json!({"x": 1}));
    }

    #[tokio::test]
    async fn holder_appliers_store_the_data() {
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        tx.apply(SnapshotEnvelope::new(Revision::new(2), 7))
            .await
            .unwrap();
        assert_eq!(*rx.borrow(), 7);

        let lock = Arc::new(RwLock::new(String::new()));
        lock.apply(SnapshotEnvelope::new(Revision::new(2), "x".to_owned()))
            .await
            .unwrap();
        assert_eq!(*lock.read().unwrap(), "x");
    }

    #[cfg(feature = "arc-swap")]
    #[tokio::test]
    async fn arc_swap_applier_stores_the_data() {
        let swap = Arc::new(arc_swap::ArcSwap::from_pointee(1u8));
        swap.apply(SnapshotEnvelope::new(Revision::new(1), 9))
            .await
            .unwrap();
        assert_eq!(**swap.load(), 9);
    }
}
