//! Refreshes run as plain calls while the provider answers and the
//! applier applies at once (`Provider::fetch_now`, `Applier::apply_now`),
//! and hand over to the worker's future at the first step that waits. The
//! engine's contract holds on both paths and across the hand-over.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Errors, failing_second_panicking_third, settle, topic};
use serde_json::{Value, json};
use state_sync::testkit::WithinLimit;
use state_sync::{
    Applier, FetchError, FetchRequest, Fetched, MemorySource, Phase, Provider, Revision,
    SnapshotEnvelope, SyncHandle, applier,
};

/// The revisions an applier saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u64>>>);

impl Seen {
    fn push(&self, revision: Revision) {
        self.0.lock().unwrap().push(revision.get());
    }

    fn all(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }

    /// An applier that applies at once, recording each revision.
    fn applier(&self) -> impl Applier<Value> + use<> {
        let seen = self.clone();
        applier::from_fn(move |s: SnapshotEnvelope<Value>| {
            seen.push(s.revision);
            Ok::<_, std::convert::Infallible>(())
        })
    }

    /// An applier that waits `delay`, then records.
    fn waiting_applier(&self, delay: Duration) -> impl Applier<Value> + use<> {
        let seen = self.clone();
        applier::from_async_fn(move |s: SnapshotEnvelope<Value>| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(delay).await;
                seen.push(s.revision);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    }

    /// An applier that records, then publishes the next revision to
    /// `source` while the applied one is in `chain`.
    fn chaining_applier(
        &self,
        source: &MemorySource<Value>,
        chain: std::ops::Range<u64>,
    ) -> impl Applier<Value> + use<> {
        let (seen, source) = (self.clone(), source.clone());
        applier::from_fn(move |s: SnapshotEnvelope<Value>| {
            seen.push(s.revision);
            if chain.contains(&s.revision.get()) {
                source.publish(json!(s.revision.get() + 1));
            }
            Ok::<_, std::convert::Infallible>(())
        })
    }

    fn assert_strictly_increasing_to(&self, last: u64) {
        let seen = self.all();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "applied out of order or twice: {seen:?}"
        );
        assert_eq!(seen.last(), Some(&last), "{seen:?}");
    }
}

/// A source in memory whose `fetch_now` is scripted: it answers, declines
/// (`None`) or panics, call by call; `fetch` always answers.
#[derive(Clone)]
struct AtOnce {
    source: MemorySource<Value>,
    /// What the n-th `fetch_now` does; answers once the script runs out.
    script: Arc<Mutex<Vec<Step>>>,
    fetches: Arc<AtomicUsize>,
    fetches_now: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Step {
    Answer,
    Decline,
    Panic,
}

impl AtOnce {
    fn new(script: &[Step]) -> Self {
        let mut script = script.to_vec();
        script.reverse();
        Self {
            source: MemorySource::new(topic(), json!(0)),
            script: Arc::new(Mutex::new(script)),
            fetches: Arc::default(),
            fetches_now: Arc::default(),
        }
    }
}

impl Provider for AtOnce {
    type Data = Value;

    async fn fetch(&self, request: &FetchRequest) -> Result<Fetched<Value>, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.source.fetch(request).await
    }

    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<Value>> {
        self.fetches_now.fetch_add(1, Ordering::SeqCst);
        let step = self.script.lock().unwrap().pop().unwrap_or(Step::Answer);
        match step {
            Step::Answer => self.source.fetch_now(request),
            Step::Decline => None,
            Step::Panic => panic!("fetch_now bug"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_at_once_source_and_applier_apply_every_burst_in_order() {
    let source = MemorySource::new(topic(), json!(0));
    let seen = Seen::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), seen.applier()).build();
    h.start().await.unwrap();
    let mut last = Revision::ZERO;
    for round in 0..20 {
        for i in 0..10 {
            last = source.publish(json!(round * 10 + i));
        }
        settle().await;
    }
    h.wait_for_revision(last).within_limit().await.unwrap();
    seen.assert_strictly_increasing_to(last.get());
    assert_eq!(h.local_revision(), last);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_applier_after_an_at_once_fetch_applies_in_turn_and_stop_waits_for_it() {
    let source = MemorySource::new(topic(), json!(0));
    let seen = Seen::default();
    let h = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        seen.waiting_applier(Duration::from_millis(10)),
    )
    .build();
    h.start().await.unwrap();
    let mut last = Revision::ZERO;
    for i in 1..=30 {
        last = source.publish(json!(i));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    h.wait_for_revision(last).within_limit().await.unwrap();
    seen.assert_strictly_increasing_to(last.get());

    // An apply in progress when stop is called finishes before stop returns;
    // nothing is applied after.
    let next = source.publish(json!("last"));
    tokio::time::sleep(Duration::from_millis(5)).await;
    h.stop().within_limit().await;
    let after_stop = seen.all();
    assert_eq!(after_stop.last(), Some(&next.get()), "{after_stop:?}");
    source.publish(json!("after stop"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.all(), after_stop);
}

#[tokio::test(start_paused = true)]
async fn a_fetch_now_that_declines_or_panics_falls_back_to_fetch() {
    let provider = AtOnce::new(&[Step::Answer, Step::Decline, Step::Panic, Step::Decline]);
    let source = provider.source.clone();
    let errors = Errors::default();
    let seen = Seen::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), provider.clone(), seen.applier())
        .on_error(errors.callback())
        .build();
    h.start().await.unwrap();
    // `start` fetches through the future.
    let start_fetches = provider.fetches.load(Ordering::SeqCst);
    let mut last = Revision::ZERO;
    for i in 1..=6 {
        last = source.publish(json!(i));
        h.wait_for_revision(last).within_limit().await.unwrap();
    }
    seen.assert_strictly_increasing_to(last.get());
    assert_eq!(seen.all().len(), 7, "every revision applied once");
    assert_eq!(provider.fetches_now.load(Ordering::SeqCst), 6);
    // Two declines and one panic went to `fetch`; three answered at once.
    assert_eq!(provider.fetches.load(Ordering::SeqCst) - start_fetches, 3);
    let reported = errors.all();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].phase, Phase::GetSnapshot);
    assert!(reported[0].will_retry);
    assert!(
        reported[0].message.contains("fetch_now bug"),
        "{reported:?}"
    );
    assert_eq!(reported[0].event_revision, Some(Revision::new(3)));
}

#[tokio::test(start_paused = true)]
async fn an_at_once_applier_that_fails_or_panics_is_reported_and_the_next_event_applies() {
    let source = MemorySource::new(topic(), json!(0));
    let errors = Errors::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let h = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        failing_second_panicking_third(&calls),
    )
    .on_error(errors.callback())
    .build();
    h.start().await.unwrap();
    source.publish(json!(1));
    settle().await;
    source.publish(json!(2));
    settle().await;
    assert_eq!(h.local_revision(), Revision::ZERO);
    let last = source.publish(json!(3));
    h.wait_for_revision(last).within_limit().await.unwrap();
    let reported = errors.all();
    assert_eq!(
        errors.phases(),
        [Phase::Apply, Phase::Apply],
        "{reported:?}"
    );
    assert_eq!(reported[0].event_revision, Some(Revision::new(1)));
    assert!(
        reported[1].message.contains("applier bug at 2"),
        "{reported:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn an_at_once_applier_that_publishes_to_its_own_source_converges() {
    let source = MemorySource::new(topic(), json!(0));
    let seen = Seen::default();
    // Each apply causes the next revision, until 10.
    let applier = seen.chaining_applier(&source, 0..10);
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), applier).build();
    h.start().await.unwrap();
    h.wait_for_revision(Revision::new(10))
        .within_limit()
        .await
        .unwrap();
    settle().await;
    assert_eq!(seen.all(), (0..=10).collect::<Vec<_>>());
    assert_eq!(source.revision(), Revision::new(10));
}

#[tokio::test(start_paused = true)]
async fn a_handle_that_never_catches_up_still_lets_other_tasks_run() {
    // Each apply publishes the next revision, forever: the worker always
    // has a refresh to run, each one at once.
    let source = MemorySource::new(topic(), json!(0));
    let applier = Seen::default().chaining_applier(&source, 0..u64::MAX);
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), applier).build();
    h.start().await.unwrap();
    // On this one-thread runtime, another task and this one still run.
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        }
    });
    async {
        while ticks.load(Ordering::SeqCst) < 20 || h.local_revision().get() < 1000 {
            tokio::task::yield_now().await;
        }
    }
    .within_limit()
    .await;
    h.stop().within_limit().await;
    let stopped_at = source.revision();
    settle().await;
    assert_eq!(source.revision(), stopped_at, "applied after stop");
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn refresh_on_delivery_applies_inside_the_publish_on_every_handle() {
    let source = MemorySource::new(topic(), json!(0));
    let mut handles = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..100 {
        let applied = Seen::default();
        let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), applied.applier())
            .refresh_on_delivery(true)
            .build();
        h.start().await.unwrap();
        handles.push(h);
        seen.push(applied);
    }
    for i in 1..=5 {
        let revision = source.publish(json!(i));
        // No await since the publish: every handle applied it in there.
        for h in &handles {
            assert_eq!(h.local_revision(), revision);
        }
    }
    for applied in &seen {
        assert_eq!(applied.all(), [0, 1, 2, 3, 4, 5]);
    }
    for h in &handles {
        h.stop().await;
    }
    source.publish(json!("after stop"));
    settle().await;
    for applied in &seen {
        assert_eq!(applied.all().last(), Some(&5), "applied after stop");
    }
}

#[tokio::test(start_paused = true)]
async fn refresh_on_delivery_hands_what_waits_to_the_worker() {
    // A provider that declines now and then, an applier that waits, and
    // an applier that publishes to its own source: each converges.
    let provider = AtOnce::new(&[Step::Decline, Step::Answer, Step::Decline]);
    let source = provider.source.clone();
    let seen = Seen::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), provider.clone(), seen.applier())
        .refresh_on_delivery(true)
        .build();
    h.start().await.unwrap();
    let mut last = Revision::ZERO;
    for i in 1..=6 {
        last = source.publish(json!(i));
    }
    h.wait_for_revision(last).within_limit().await.unwrap();
    seen.assert_strictly_increasing_to(last.get());
    // The declined refresh was taken up again by the worker.
    assert!(provider.fetches_now.load(Ordering::SeqCst) >= 2);

    let waiting = Seen::default();
    let slow = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        waiting.waiting_applier(Duration::from_millis(5)),
    )
    .refresh_on_delivery(true)
    .build();
    slow.start().await.unwrap();
    for i in 0..10 {
        last = source.publish(json!(i));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    slow.wait_for_revision(last).within_limit().await.unwrap();
    waiting.assert_strictly_increasing_to(last.get());

    let own = MemorySource::new(topic(), json!(0));
    let chained = Seen::default();
    let applier = chained.chaining_applier(&own, 1..10);
    let chain = SyncHandle::from_parts(topic(), own.clone(), own.clone(), applier)
        .refresh_on_delivery(true)
        .build();
    chain.start().await.unwrap();
    own.publish(json!(1));
    chain
        .wait_for_revision(Revision::new(10))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(chained.all(), (0..=10).collect::<Vec<_>>());
}
