//! Controllable roles for engine tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use state_sync::{
    Applier, BoxError, Error, FetchError, FetchRequest, Fetched, InvalidationEvent,
    InvalidationSink, Phase, Provider, Revision, SnapshotEnvelope, Subscriber, Subscription, Topic,
    applier,
};
use tokio::sync::Semaphore;

pub fn topic() -> Topic {
    Topic::new("settings").unwrap()
}

pub fn event(revision: u64) -> InvalidationEvent {
    InvalidationEvent::new(topic(), Revision::new(revision))
}

/// What a scripted fetch answers.
#[derive(Clone)]
pub enum Answer {
    /// The source's current snapshot.
    Current,
    /// A provider failure.
    Fail,
    /// A raw JSON snapshot decoded with `SnapshotEnvelope::from_json`.
    Raw(&'static str),
}

#[derive(Default)]
struct SourceState {
    revision: u64,
    data: Value,
    sinks: Vec<InvalidationSink>,
    script: std::collections::VecDeque<Answer>,
    fetch_requests: Vec<Option<Revision>>,
}

/// A hand-driven source: the test decides what every fetch answers, can
/// hold fetches in flight, and injects events straight into the sinks.
#[derive(Clone)]
pub struct ScriptedSource {
    state: Arc<Mutex<SourceState>>,
    pub subscribes: Arc<AtomicUsize>,
    pub unsubscribes: Arc<AtomicUsize>,
    pub fetches: Arc<AtomicUsize>,
    /// When set, each fetch waits for one permit.
    hold: Arc<Mutex<Option<Arc<Semaphore>>>>,
    fetch_delay: Arc<Mutex<Duration>>,
    fail_subscribe: Arc<AtomicBool>,
    honour_conditional: Arc<AtomicBool>,
}

impl ScriptedSource {
    pub fn new(revision: u64, data: Value) -> Self {
        let s = ScriptedSource {
            state: Arc::default(),
            subscribes: Arc::default(),
            unsubscribes: Arc::default(),
            fetches: Arc::default(),
            hold: Arc::default(),
            fetch_delay: Arc::default(),
            fail_subscribe: Arc::default(),
            honour_conditional: Arc::new(AtomicBool::new(true)),
        };
        {
            let mut st = s.state.lock().unwrap();
            st.revision = revision;
            st.data = data;
        }
        s
    }

    /// Sets the source state without telling anyone.
    pub fn set(&self, revision: u64, data: Value) {
        let mut st = self.state.lock().unwrap();
        st.revision = revision;
        st.data = data;
    }

    /// Sets the state and delivers the invalidation to every sink.
    pub fn publish(&self, revision: u64, data: Value) {
        self.set(revision, data);
        self.emit(&event(revision));
    }

    pub fn emit(&self, event: &InvalidationEvent) {
        for sink in self.sinks() {
            sink.deliver(event);
        }
    }

    pub fn emit_raw(&self, raw: &[u8]) {
        for sink in self.sinks() {
            sink.deliver_json(raw);
        }
    }

    pub fn sinks(&self) -> Vec<InvalidationSink> {
        self.state.lock().unwrap().sinks.clone()
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Fetches wait for permits from the returned semaphore.
    pub fn hold_fetches(&self) -> Arc<Semaphore> {
        let sem = Arc::new(Semaphore::new(0));
        *self.hold.lock().unwrap() = Some(sem.clone());
        sem
    }

    pub fn set_fetch_delay(&self, d: Duration) {
        *self.fetch_delay.lock().unwrap() = d;
    }

    pub fn fail_subscribe(&self, fail: bool) {
        self.fail_subscribe.store(fail, Ordering::SeqCst);
    }

    pub fn ignore_conditional(&self) {
        self.honour_conditional.store(false, Ordering::SeqCst);
    }

    pub fn fetch_count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    pub fn fetch_requests(&self) -> Vec<Option<Revision>> {
        self.state.lock().unwrap().fetch_requests.clone()
    }
}

impl Subscriber for ScriptedSource {
    async fn subscribe(
        &self,
        _topic: &Topic,
        sink: InvalidationSink,
    ) -> Result<Subscription, BoxError> {
        tokio::task::yield_now().await;
        if self.fail_subscribe.load(Ordering::SeqCst) {
            return Err("subscribe refused".into());
        }
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        self.state.lock().unwrap().sinks.push(sink);
        let state = self.state.clone();
        let unsubscribes = self.unsubscribes.clone();
        Ok(Subscription::new(move || {
            unsubscribes.fetch_add(1, Ordering::SeqCst);
            state.lock().unwrap().sinks.clear();
        }))
    }
}

impl Provider for ScriptedSource {
    type Data = Value;

    async fn fetch(&self, request: &FetchRequest) -> Result<Fetched<Value>, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let hold = self.hold.lock().unwrap().clone();
        if let Some(sem) = hold {
            sem.acquire().await.unwrap().forget();
        }
        // The answer is what the source held when the fetch started.
        let answer = self.answer(request);
        let delay = *self.fetch_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        answer
    }
}

impl ScriptedSource {
    fn answer(&self, request: &FetchRequest) -> Result<Fetched<Value>, FetchError> {
        let mut st = self.state.lock().unwrap();
        st.fetch_requests.push(request.if_newer_than);
        match st.script.pop_front().unwrap_or(Answer::Current) {
            Answer::Fail => Err(FetchError::unavailable("source down")),
            Answer::Raw(raw) => Ok(Fetched::Snapshot(SnapshotEnvelope::from_json(
                raw.as_bytes(),
            )?)),
            Answer::Current => {
                let current = Revision::new(st.revision);
                if self.honour_conditional.load(Ordering::SeqCst)
                    && request.if_newer_than >= Some(current)
                {
                    return Ok(Fetched::NotModified { revision: current });
                }
                Ok(Fetched::Snapshot(SnapshotEnvelope::new(
                    current,
                    st.data.clone(),
                )))
            }
        }
    }
}

/// Collects reported errors as (phase, will_retry, attempt, retry delay).
#[derive(Clone, Default)]
pub struct Errors(Arc<Mutex<Vec<Reported>>>);

#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    pub phase: Phase,
    pub will_retry: bool,
    pub attempt: Option<u32>,
    pub retry_delay: Option<Duration>,
    pub raw_event: Option<String>,
    pub raw_snapshot: Option<String>,
    pub message: String,
    pub event_revision: Option<Revision>,
    pub at: tokio::time::Instant,
}

impl Errors {
    pub fn callback(&self) -> impl Fn(&Error) + Send + Sync + 'static {
        let list = self.0.clone();
        move |e: &Error| {
            list.lock().unwrap().push(Reported {
                phase: e.phase(),
                will_retry: e.will_retry(),
                attempt: e.context().attempt,
                retry_delay: e.context().retry_delay,
                raw_event: e.context().raw_event.clone(),
                raw_snapshot: e.context().raw_snapshot.clone(),
                message: e.to_string(),
                event_revision: e.context().event_revision,
                at: tokio::time::Instant::now(),
            });
        }
    }

    pub fn all(&self) -> Vec<Reported> {
        self.0.lock().unwrap().clone()
    }

    pub fn phases(&self) -> Vec<Phase> {
        self.all().into_iter().map(|r| r.phase).collect()
    }
}

/// Lets spawned tasks (worker, delayed deliveries) run to quiescence.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// An applier that applies at once and counts its calls: the second
/// fails, the third panics, the others succeed.
pub fn failing_second_panicking_third(calls: &Arc<AtomicUsize>) -> impl Applier<Value> + use<> {
    let calls = calls.clone();
    applier::from_fn(
        move |s: SnapshotEnvelope<Value>| match calls.fetch_add(1, Ordering::SeqCst) {
            1 => Err("disk full"),
            2 => panic!("applier bug at {}", s.revision),
            _ => Ok(()),
        },
    )
}
