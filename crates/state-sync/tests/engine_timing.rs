//! Debounce, throttle and retry timings on Tokio's paused clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Answer, Errors, ScriptedSource, settle, topic};
use serde_json::json;
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{Phase, RetryPolicy, Revision, SyncHandle, Throttle};
use tokio::time::{Instant, advance};

const MS: Duration = Duration::from_millis(1);

async fn started(
    source: &ScriptedSource,
    configure: impl FnOnce(
        state_sync::SyncHandleBuilder<ScriptedSource, ScriptedSource, Recorder<serde_json::Value>>,
    ) -> state_sync::SyncHandleBuilder<
        ScriptedSource,
        ScriptedSource,
        Recorder<serde_json::Value>,
    >,
    errors: &Errors,
) -> SyncHandle {
    let builder = SyncHandle::from_parts(topic(), source.clone(), source.clone(), Recorder::new())
        .on_error(errors.callback());
    let h = configure(builder).build();
    h.start().await.unwrap();
    h
}

/// Advances the paused clock by `d` and lets the engine react.
async fn wait(d: Duration) {
    advance(d).await;
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn debounce_waits_for_silence() {
    let source = ScriptedSource::new(0, json!(0));
    let errors = Errors::default();
    let h = started(&source, |b| b.debounce(100 * MS), &errors).await;
    for r in 1..=5 {
        source.publish(r, json!(r));
        wait(60 * MS).await; // never 100 ms of silence
    }
    assert_eq!(source.fetch_count(), 1, "still only the start fetch");
    wait(39 * MS).await;
    assert_eq!(source.fetch_count(), 1);
    wait(2 * MS).await;
    assert_eq!(source.fetch_count(), 2);
    assert_eq!(h.local_revision(), Revision::new(5));
}

#[tokio::test(start_paused = true)]
async fn throttle_leading_and_trailing_fires_at_once_then_at_the_window_end() {
    let source = ScriptedSource::new(0, json!(0));
    let h = started(
        &source,
        |b| b.throttle(Throttle::new(100 * MS)),
        &Errors::default(),
    )
    .await;
    source.publish(1, json!(1));
    settle().await;
    assert_eq!(source.fetch_count(), 2, "leading edge");
    for r in 2..=4 {
        wait(20 * MS).await;
        source.publish(r, json!(r));
    }
    settle().await;
    assert_eq!(source.fetch_count(), 2);
    wait(39 * MS).await; // t = 99 ms
    assert_eq!(source.fetch_count(), 2);
    wait(2 * MS).await; // t = 101 ms
    assert_eq!(source.fetch_count(), 3, "one trailing fetch");
    assert_eq!(h.local_revision(), Revision::new(4));
}

#[tokio::test(start_paused = true)]
async fn throttle_refreshes_at_once_after_a_quiet_window() {
    let source = ScriptedSource::new(0, json!(0));
    let h = started(
        &source,
        |b| b.throttle(Throttle::new(100 * MS)),
        &Errors::default(),
    )
    .await;
    source.publish(1, json!(1));
    settle().await;
    assert_eq!(source.fetch_count(), 2, "leading edge at t = 0");
    wait(150 * MS).await;
    // The window of the t = 0 refresh ended at t = 100 with nothing queued:
    // this invalidation is outside any window and refreshes at once.
    source.publish(2, json!(2));
    settle().await;
    assert_eq!(source.fetch_count(), 3, "leading edge at t = 150, not 200");
    assert_eq!(h.local_revision(), Revision::new(2));
    // It opened a window of its own: one inside it waits for its end.
    wait(50 * MS).await;
    source.publish(3, json!(3));
    settle().await;
    assert_eq!(source.fetch_count(), 3);
    wait(51 * MS).await; // t = 251 ms
    assert_eq!(source.fetch_count(), 4, "trailing edge at t = 250");
}

#[tokio::test(start_paused = true)]
async fn throttle_trailing_only_delays_the_first_refresh_by_one_window() {
    let source = ScriptedSource::new(0, json!(0));
    let h = started(
        &source,
        |b| b.throttle(Throttle::new(100 * MS).leading(false)),
        &Errors::default(),
    )
    .await;
    source.publish(1, json!(1));
    settle().await;
    wait(99 * MS).await;
    assert_eq!(source.fetch_count(), 1);
    wait(2 * MS).await;
    assert_eq!(source.fetch_count(), 2);
    assert_eq!(h.local_revision(), Revision::new(1));
}

#[tokio::test(start_paused = true)]
async fn throttle_leading_only_drops_invalidations_inside_the_window() {
    let source = ScriptedSource::new(0, json!(0));
    let errors = Errors::default();
    let h = started(
        &source,
        |b| b.throttle(Throttle::new(100 * MS).trailing(false)),
        &errors,
    )
    .await;
    source.publish(1, json!(1));
    settle().await;
    assert_eq!(source.fetch_count(), 2);
    wait(50 * MS).await;
    source.publish(2, json!(2));
    settle().await;
    wait(200 * MS).await;
    assert_eq!(source.fetch_count(), 2, "no trailing edge");
    assert_eq!(h.local_revision(), Revision::new(1));
    source.publish(3, json!(3));
    settle().await;
    assert_eq!(
        h.local_revision(),
        Revision::new(3),
        "new window, leading edge"
    );
    assert!(
        errors.all().is_empty(),
        "drops inside a window are not errors"
    );
}

#[tokio::test(start_paused = true)]
async fn throttle_with_neither_edge_never_refreshes_and_says_so() {
    let source = ScriptedSource::new(0, json!(0));
    let errors = Errors::default();
    let h = started(
        &source,
        |b| b.throttle(Throttle::new(100 * MS).leading(false).trailing(false)),
        &errors,
    )
    .await;
    source.publish(1, json!(1));
    wait(500 * MS).await;
    assert_eq!(source.fetch_count(), 1);
    assert_eq!(errors.phases(), [Phase::Throttle]);
    h.refresh().await.unwrap();
    assert_eq!(
        h.local_revision(),
        Revision::new(1),
        "explicit refresh still works"
    );
}

#[tokio::test(start_paused = true)]
async fn debounce_feeds_the_throttle() {
    let source = ScriptedSource::new(0, json!(0));
    let h = started(
        &source,
        |b| b.debounce(50 * MS).throttle(Throttle::new(200 * MS)),
        &Errors::default(),
    )
    .await;
    source.publish(1, json!(1));
    settle().await;
    wait(49 * MS).await;
    assert_eq!(source.fetch_count(), 1);
    wait(2 * MS).await; // t=51: debounced, leading edge opens a window
    assert_eq!(source.fetch_count(), 2);
    source.publish(2, json!(2));
    settle().await;
    wait(60 * MS).await; // t=111: debounced at t=101, inside the window
    assert_eq!(source.fetch_count(), 2);
    wait(139 * MS).await; // t=250
    assert_eq!(source.fetch_count(), 2);
    wait(2 * MS).await; // t=252: the window (t=51..251) ended: trailing edge
    assert_eq!(source.fetch_count(), 3);
    assert_eq!(h.local_revision(), Revision::new(2));
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_and_each_retry_is_reported() {
    let source = ScriptedSource::new(1, json!(1));
    source.script([Answer::Fail, Answer::Fail, Answer::Fail, Answer::Fail]);
    let errors = Errors::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), Recorder::new())
        .on_error(errors.callback())
        .retry(RetryPolicy::default().max_attempts(5))
        .build();
    let t0 = Instant::now();
    h.start().await.unwrap();
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(500 + 1000 + 2000 + 4000)
    );
    let reported = errors.all();
    let summary: Vec<_> = reported
        .iter()
        .map(|r| (r.phase, r.attempt, r.will_retry, r.retry_delay))
        .collect();
    let s = |ms| Some(Duration::from_millis(ms));
    assert_eq!(
        summary,
        [
            (Phase::GetSnapshot, Some(1), true, s(500)),
            (Phase::GetSnapshot, Some(2), true, s(1000)),
            (Phase::GetSnapshot, Some(3), true, s(2000)),
            (Phase::GetSnapshot, Some(4), true, s(4000)),
        ]
    );
    assert_eq!(h.local_revision(), Revision::new(1));
}

#[tokio::test(start_paused = true)]
async fn default_retry_gives_up_after_three_attempts() {
    let source = ScriptedSource::new(1, json!(1));
    source.script([Answer::Fail, Answer::Fail, Answer::Fail]);
    let errors = Errors::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), Recorder::new())
        .on_error(errors.callback())
        .build();
    let t0 = Instant::now();
    let err = h.start().await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    assert_eq!(err.context().attempt, Some(3));
    assert!(!err.will_retry());
    assert_eq!(source.fetch_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn jittered_retries_stay_within_bounds() {
    let source = ScriptedSource::new(1, json!(1));
    source.script([Answer::Fail, Answer::Fail]);
    let errors = Errors::default();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), Recorder::new())
        .on_error(errors.callback())
        .retry(RetryPolicy::default().jitter(true))
        .build();
    h.start().await.unwrap();
    let delays: Vec<_> = errors
        .all()
        .iter()
        .map(|r| r.retry_delay.unwrap())
        .collect();
    assert!(delays[0] >= 250 * MS && delays[0] <= 500 * MS, "{delays:?}");
    assert!(
        delays[1] >= 500 * MS && delays[1] <= 1000 * MS,
        "{delays:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_cancels_a_pending_retry() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = started(&source, |b| b, &errors).await;
    source.script([Answer::Fail]);
    source.publish(2, json!(2));
    settle().await;
    assert_eq!(errors.phases(), [Phase::GetSnapshot]);
    h.stop().await;
    wait(Duration::from_secs(5)).await;
    assert_eq!(source.fetch_count(), 2, "the retry never ran");
    assert_eq!(h.local_revision(), Revision::new(1));
}

#[tokio::test(start_paused = true)]
async fn invalidation_refresh_errors_are_reported_and_the_engine_keeps_running() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = started(&source, |b| b.retry(RetryPolicy::none()), &errors).await;
    source.script([Answer::Fail]);
    source.publish(2, json!(2));
    settle().await;
    assert_eq!(errors.phases(), [Phase::GetSnapshot]);
    let reported = &errors.all()[0];
    assert_eq!(reported.event_revision, Some(Revision::new(2)));
    // The causing event travels with the error, and printing the error the
    // obvious way says why it failed.
    let raw: serde_json::Value =
        serde_json::from_str(reported.raw_event.as_deref().unwrap()).unwrap();
    assert_eq!(raw["revision"], "2");
    assert_eq!(raw["topic"], "settings");
    assert_eq!(reported.raw_snapshot, None);
    assert!(
        reported.message.ends_with("source down"),
        "{}",
        reported.message
    );
    source.publish(3, json!(3));
    h.wait_for_revision(Revision::new(3))
        .within_limit()
        .await
        .unwrap();
}
