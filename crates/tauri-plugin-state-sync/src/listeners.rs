//! Where invalidations go: Tauri events for topics every window may read,
//! per-window IPC channels for the others.
//!
//! Tauri hands an event to every listener registered with the global
//! `listen`, whatever window it is in and whatever target the event names
//! (`emit_to` and `emit_filter` narrow only window-scoped listeners). So an
//! event can never keep a topic from a window. A topic some window may not
//! read is therefore never emitted as an event: it goes only through the
//! channels that windows allowed to read it opened with the `listen`
//! command.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tauri::ipc::Channel;
use tauri::{AppHandle, Emitter, Runtime};

use crate::{Config, InvalidationPayload, lock};

/// The channels windows opened with the `listen` command.
pub(crate) struct Listeners<R: Runtime> {
    app: AppHandle<R>,
    config: Config,
    event_name: String,
    next_id: AtomicU32,
    channels: Mutex<Vec<Listener>>,
}

struct Listener {
    id: u32,
    window: String,
    channel: Channel<InvalidationPayload>,
}

impl<R: Runtime> Listeners<R> {
    pub(crate) fn new(app: AppHandle<R>, config: Config, event_name: String) -> Self {
        Listeners {
            app,
            config,
            event_name,
            next_id: AtomicU32::new(1),
            channels: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Registers `window`'s channel; returns its id for `unlisten`.
    pub(crate) fn listen(&self, window: &str, channel: Channel<InvalidationPayload>) -> u32 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.channels).push(Listener {
            id,
            window: window.to_owned(),
            channel,
        });
        id
    }

    /// Removes `window`'s channel `id`; whether it was there.
    pub(crate) fn unlisten(&self, window: &str, id: u32) -> bool {
        let mut channels = lock(&self.channels);
        let before = channels.len();
        channels.retain(|l| !(l.id == id && l.window == window));
        channels.len() != before
    }

    /// Forgets every channel of `window` (closed, or its page reloaded).
    pub(crate) fn forget_window(&self, window: &str) {
        lock(&self.channels).retain(|l| l.window != window);
    }

    /// How many channels are open (all windows).
    pub(crate) fn len(&self) -> usize {
        lock(&self.channels).len()
    }

    /// Delivers one invalidation to exactly the windows that may read its
    /// topic.
    pub(crate) fn deliver(&self, payload: &InvalidationPayload) {
        if self.config.readable_by_every_window(&payload.topic)
            && let Err(e) = self.app.emit(&self.event_name, payload)
        {
            tracing::warn!(topic = %payload.topic, error = %e, "cannot emit the invalidation event");
        }
        // Cloned out of the lock: sending evaluates script in a webview.
        let targets: Vec<Channel<InvalidationPayload>> = lock(&self.channels)
            .iter()
            .filter(|l| self.config.allows(&l.window, &payload.topic))
            .map(|l| l.channel.clone())
            .collect();
        for channel in targets {
            if let Err(e) = channel.send(payload.clone()) {
                tracing::warn!(topic = %payload.topic, error = %e, "cannot send the invalidation to a window");
            }
        }
    }
}
