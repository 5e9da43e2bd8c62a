//! The engine contract (SPEC §3), one test per point.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    Answer, Errors, ScriptedSource, event, failing_second_panicking_third, settle, topic,
};
use serde_json::{Value, json};
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{Phase, Revision, SnapshotEnvelope, Status, SyncHandle, applier};

fn handle(source: &ScriptedSource, recorder: &Recorder<Value>, errors: &Errors) -> SyncHandle {
    SyncHandle::from_parts(topic(), source.clone(), source.clone(), recorder.clone())
        .on_error(errors.callback())
        .retry(state_sync::RetryPolicy::none())
        .build()
}

#[tokio::test(start_paused = true)]
async fn first_snapshot_is_applied_even_at_revision_zero() {
    let source = ScriptedSource::new(0, json!({"a": 1}));
    let recorder = Recorder::with_data();
    let h = handle(&source, &recorder, &Errors::default());
    assert_eq!(h.status(), Status::Idle);
    h.start().await.unwrap();
    assert_eq!(recorder.revisions(), [Revision::ZERO]);
    assert_eq!(recorder.last_data(), Some(json!({"a": 1})));
    assert_eq!(h.status(), Status::Live);
    assert_eq!(h.local_revision(), Revision::ZERO);
}

#[tokio::test(start_paused = true)]
async fn stale_and_equal_invalidations_cause_no_fetch() {
    let source = ScriptedSource::new(5, json!(1));
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.start().await.unwrap();
    assert_eq!(source.fetch_count(), 1);
    for r in [0, 3, 5, 5, 4] {
        source.emit(&event(r));
    }
    settle().await;
    assert_eq!(source.fetch_count(), 1);
    source.publish(6, json!(2));
    h.wait_for_revision(Revision::new(6))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(source.fetch_count(), 2);
    assert_eq!(recorder.revisions(), [Revision::new(5), Revision::new(6)]);
}

#[tokio::test(start_paused = true)]
async fn events_for_other_topics_are_ignored_without_error() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    h.start().await.unwrap();
    source.set(9, json!(9));
    let other = state_sync::InvalidationEvent::new(
        state_sync::Topic::new("other").unwrap(),
        Revision::new(9),
    );
    source.emit(&other);
    source.emit_raw(br#"{"topic":"other","revision":"10"}"#);
    source.emit_raw(br#"{"topic":"other","revision":"010"}"#);
    settle().await;
    assert_eq!(source.fetch_count(), 1);
    assert!(errors.all().is_empty());
    assert_eq!(h.local_revision(), Revision::new(1));
}

#[tokio::test(start_paused = true)]
async fn bad_events_are_one_protocol_error_each_and_the_engine_keeps_working() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    h.start().await.unwrap();
    let bad: [&[u8]; 4] = [
        br#"{"topic":"","revision":"2"}"#,
        br#"{"topic":"settings","revision":"02"}"#,
        br#"{"topic":"settings","revision":2}"#,
        b"{not json",
    ];
    for raw in bad {
        source.emit_raw(raw);
    }
    settle().await;
    let reported = errors.all();
    assert_eq!(reported.len(), 4);
    for (r, raw) in reported.iter().zip(bad) {
        assert_eq!(r.phase, Phase::Protocol);
        assert_eq!(
            r.raw_event.as_deref(),
            Some(std::str::from_utf8(raw).unwrap())
        );
        assert_eq!(r.raw_snapshot, None);
    }
    assert_eq!(source.fetch_count(), 1);
    source.set(2, json!(2));
    source.emit_raw(br#"{"topic":"settings","revision":"2"}"#);
    h.wait_for_revision(Revision::new(2))
        .within_limit()
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn non_canonical_snapshot_revision_fails_start_and_rolls_back() {
    let source = ScriptedSource::new(1, json!(1));
    source.script([Answer::Raw(r#"{"revision":"007","data":1}"#)]);
    let recorder = Recorder::new();
    let errors = Errors::default();
    let h = handle(&source, &recorder, &errors);
    let err = h.start().await.unwrap_err();
    assert_eq!(err.phase(), Phase::Protocol);
    assert!(
        err.context()
            .raw_snapshot
            .as_deref()
            .unwrap()
            .contains("007")
    );
    assert_eq!(err.context().raw_event, None, "start has no causing event");
    assert!(recorder.is_empty());
    assert_eq!(source.subscribes.load(Ordering::SeqCst), 1);
    assert_eq!(source.unsubscribes.load(Ordering::SeqCst), 1);
    assert!(source.sinks().is_empty());
    assert_eq!(h.status(), Status::Idle);
    assert_eq!(errors.phases(), [Phase::Protocol]);
    // Rolled back, so it can start again.
    h.start().await.unwrap();
    assert_eq!(recorder.revisions(), [Revision::new(1)]);
}

#[tokio::test(start_paused = true)]
async fn failed_subscribe_fails_start_without_fetching() {
    let source = ScriptedSource::new(1, json!(1));
    source.fail_subscribe(true);
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    let err = h.start().await.unwrap_err();
    assert_eq!(err.phase(), Phase::Subscribe);
    assert_eq!(source.fetch_count(), 0);
    assert_eq!(h.status(), Status::Idle);
}

#[tokio::test(start_paused = true)]
async fn failed_initial_fetch_unsubscribes() {
    let source = ScriptedSource::new(1, json!(1));
    source.script([Answer::Fail]);
    let h = handle(&source, &Recorder::new(), &Errors::default());
    let err = h.start().await.unwrap_err();
    assert_eq!(err.phase(), Phase::GetSnapshot);
    assert_eq!(source.unsubscribes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_fetch_in_flight_when_stop_is_called_is_never_applied() {
    let source = ScriptedSource::new(1, json!(1));
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.start().await.unwrap();
    let permits = source.hold_fetches();
    source.publish(2, json!(2));
    settle().await;
    assert_eq!(source.fetch_count(), 2, "fetch is in flight");
    h.stop().await;
    permits.add_permits(10);
    settle().await;
    assert_eq!(recorder.revisions(), [Revision::new(1)]);
    assert_eq!(h.status(), Status::Stopped);
    assert_eq!(h.local_revision(), Revision::new(1), "stays readable");
    assert_eq!(source.unsubscribes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn stop_waits_for_a_running_apply() {
    let source = ScriptedSource::new(1, json!(1));
    let applied = Arc::new(AtomicUsize::new(0));
    let counter = applied.clone();
    let h = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        applier::from_async_fn(move |_s: SnapshotEnvelope<Value>| {
            let counter = counter.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        }),
    )
    .build();
    h.start().await.unwrap();
    source.publish(2, json!(2));
    settle().await;
    let before = applied.load(Ordering::SeqCst);
    assert_eq!(before, 1, "second apply is running");
    h.stop().await;
    assert_eq!(applied.load(Ordering::SeqCst), 2, "stop returned after it");
}

#[tokio::test(start_paused = true)]
async fn concurrent_starts_subscribe_and_fetch_once() {
    let source = ScriptedSource::new(1, json!(1));
    let h = handle(&source, &Recorder::new(), &Errors::default());
    let (a, b, c) = tokio::join!(h.start(), h.start(), h.start());
    a.unwrap();
    b.unwrap();
    c.unwrap();
    h.start().await.unwrap();
    assert_eq!(source.subscribes.load(Ordering::SeqCst), 1);
    assert_eq!(source.fetch_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn start_after_stop_fails_in_the_start_phase() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    h.start().await.unwrap();
    h.stop().await;
    h.stop().await; // idempotent
    let err = h.start().await.unwrap_err();
    assert_eq!(err.phase(), Phase::Start);
    assert!(err.is_stopped());
    assert_eq!(source.subscribes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_works_before_start_and_is_a_no_op_after_stop() {
    let source = ScriptedSource::new(3, json!(3));
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.refresh().await.unwrap();
    assert_eq!(recorder.revisions(), [Revision::new(3)]);
    assert_eq!(source.subscribes.load(Ordering::SeqCst), 0);
    h.stop().await;
    source.set(4, json!(4));
    h.refresh().await.unwrap();
    assert_eq!(recorder.revisions(), [Revision::new(3)]);
    assert_eq!(source.fetch_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_returns_errors_to_the_caller() {
    let source = ScriptedSource::new(3, json!(3));
    source.script([Answer::Fail]);
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    let err = h.refresh().await.unwrap_err();
    assert_eq!(err.phase(), Phase::GetSnapshot);
    assert!(!err.will_retry());
    assert_eq!(errors.phases(), [Phase::GetSnapshot]);
}

#[tokio::test(start_paused = true)]
async fn an_applier_that_causes_its_own_invalidation_converges() {
    let source = ScriptedSource::new(1, json!(1));
    let inner = source.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let h = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        applier::from_fn(move |s: SnapshotEnvelope<Value>| {
            log.lock().unwrap().push(s.revision.get());
            // Applying revision r writes r + 1 back, up to 5, synchronously.
            if s.revision.get() < 5 {
                inner.publish(s.revision.get() + 1, json!(s.revision.get() + 1));
            }
            Ok::<_, std::convert::Infallible>(())
        }),
    )
    .build();
    h.start().await.unwrap();
    h.wait_for_revision(Revision::new(5))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn refresh_and_stop_from_inside_the_applier_do_not_deadlock() {
    let source = ScriptedSource::new(1, json!(1));
    let slot: Arc<std::sync::OnceLock<SyncHandle>> = Arc::default();
    let inner = slot.clone();
    let src = source.clone();
    let h = SyncHandle::from_parts(
        topic(),
        source.clone(),
        source.clone(),
        applier::from_async_fn(move |s: SnapshotEnvelope<Value>| {
            let handle = inner.get().cloned();
            let src = src.clone();
            async move {
                if let Some(h) = handle {
                    if s.revision.get() == 2 {
                        src.set(3, json!(3));
                        h.refresh().await.unwrap(); // queued, returns at once
                    } else if s.revision.get() == 3 {
                        h.stop().await; // does not wait for itself
                    }
                }
                Ok::<_, std::convert::Infallible>(())
            }
        }),
    )
    .build();
    slot.set(h.clone()).unwrap();
    h.start().await.unwrap();
    source.publish(2, json!(2));
    let mut status = h.watch_status();
    status.wait_for(|s| *s == Status::Stopped).await.unwrap();
    assert_eq!(h.local_revision(), Revision::new(3));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_error_callback_does_not_stop_the_engine() {
    let source = ScriptedSource::new(1, json!(1));
    let recorder = Recorder::new();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), recorder.clone())
        .on_error(|_| panic!("callback bug"))
        .build();
    h.start().await.unwrap();
    source.emit_raw(b"garbage");
    source.emit_raw(b"more garbage");
    settle().await;
    source.publish(2, json!(2));
    h.wait_for_revision(Revision::new(2))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(h.status(), Status::Live);
}

#[tokio::test(start_paused = true)]
async fn a_failing_or_panicking_applier_is_reported_and_retried_by_the_next_event() {
    let source = ScriptedSource::new(1, json!(1));
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
    source.publish(2, json!(2));
    settle().await;
    source.publish(3, json!(3));
    settle().await;
    assert_eq!(h.local_revision(), Revision::new(1));
    source.publish(4, json!(4));
    h.wait_for_revision(Revision::new(4))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(errors.phases(), [Phase::Apply, Phase::Apply]);
}

#[tokio::test(start_paused = true)]
async fn many_invalidations_during_one_slow_fetch_cause_at_most_one_more_fetch() {
    let source = ScriptedSource::new(1, json!(1));
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.start().await.unwrap();
    source.set_fetch_delay(Duration::from_secs(1));
    source.publish(2, json!(2));
    settle().await;
    for r in 3..=100 {
        source.publish(r, json!(r));
    }
    h.wait_for_revision(Revision::new(100))
        .within_limit()
        .await
        .unwrap();
    settle().await;
    assert_eq!(source.fetch_count(), 3, "start + in-flight + one coalesced");
    assert_eq!(
        recorder.revisions(),
        [Revision::new(1), Revision::new(2), Revision::new(100)]
    );
}

#[tokio::test(start_paused = true)]
async fn should_refresh_can_veto_own_writes() {
    let source = ScriptedSource::new(1, json!(1));
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), Recorder::new())
        .should_refresh(|e| e.source_id.as_deref() != Some("me"))
        .build();
    h.start().await.unwrap();
    source.set(2, json!(2));
    source.emit(&event(2).with_source_id("me"));
    settle().await;
    assert_eq!(source.fetch_count(), 1);
    source.emit(&event(2).with_source_id("other"));
    h.wait_for_revision(Revision::new(2))
        .within_limit()
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn conditional_fetch_sends_the_local_revision_and_accepts_not_modified() {
    let source = ScriptedSource::new(4, json!(4));
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.start().await.unwrap();
    h.refresh().await.unwrap();
    assert_eq!(source.fetch_requests(), [None, Some(Revision::new(4))]);
    assert_eq!(recorder.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_older_snapshot_is_never_applied() {
    let source = ScriptedSource::new(4, json!(4));
    source.ignore_conditional();
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    h.start().await.unwrap();
    source.set(3, json!(3));
    h.refresh().await.unwrap();
    source.emit(&event(5)); // source still answers 3
    settle().await;
    assert_eq!(recorder.revisions(), [Revision::new(4)]);
}

#[tokio::test(start_paused = true)]
async fn connection_loss_is_observable_and_recovery_refreshes() {
    let source = ScriptedSource::new(1, json!(1));
    let errors = Errors::default();
    let h = handle(&source, &Recorder::new(), &errors);
    h.start().await.unwrap();
    let sink = source.sinks().pop().unwrap();
    sink.connection_lost("socket closed");
    assert_eq!(h.status(), Status::Interrupted);
    assert_eq!(errors.phases(), [Phase::Subscribe]);
    source.set(7, json!(7)); // the invalidation was missed
    sink.connection_restored();
    h.wait_for_revision(Revision::new(7))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(h.status(), Status::Live);
}

#[tokio::test(start_paused = true)]
async fn invalidations_during_start_are_not_lost() {
    let source = ScriptedSource::new(1, json!(1));
    let permits = source.hold_fetches();
    let recorder = Recorder::new();
    let h = handle(&source, &recorder, &Errors::default());
    let starting = tokio::spawn({
        let h = h.clone();
        async move { h.start().await }
    });
    settle().await;
    // Subscribed, first fetch in flight (it will answer revision 1).
    source.emit(&event(2));
    permits.add_permits(1);
    starting.await.unwrap().unwrap();
    source.set(2, json!(2));
    permits.add_permits(1);
    h.wait_for_revision(Revision::new(2))
        .within_limit()
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_for_revision_fails_when_stopped() {
    let source = ScriptedSource::new(1, json!(1));
    let h = handle(&source, &Recorder::new(), &Errors::default());
    h.start().await.unwrap();
    let waiter = tokio::spawn({
        let h = h.clone();
        async move { h.wait_for_revision(Revision::new(9)).within_limit().await }
    });
    settle().await;
    h.stop().await;
    assert!(waiter.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_unsubscribes() {
    let source = ScriptedSource::new(1, json!(1));
    let h = handle(&source, &Recorder::new(), &Errors::default());
    h.start().await.unwrap();
    let sink = source.sinks().pop().unwrap();
    drop(h);
    settle().await;
    assert!(sink.is_closed());
    assert_eq!(source.unsubscribes.load(Ordering::SeqCst), 1);
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<SyncHandle>();
    send_sync::<state_sync::Error>();
    send_sync::<state_sync::InvalidationSink>();
    send_sync::<state_sync::Subscription>();
    send_sync::<state_sync::MemorySource<Value>>();
    send_sync::<state_sync::InvalidationEvent>();
    send_sync::<state_sync::ProtocolError>();
    let source = ScriptedSource::new(0, json!(0));
    let h = handle(&source, &Recorder::new(), &Errors::default());
    send(&h.start());
    send(&h.stop());
    send(&h.refresh());
    send(&h.wait_for_revision(Revision::ZERO));
}

#[tokio::test(start_paused = true)]
async fn initial_revision_makes_start_conditional() {
    let source = ScriptedSource::new(7, json!("cached"));
    let recorder = Recorder::with_data();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), recorder.clone())
        .initial_revision(Revision::new(7))
        .build();
    h.start().await.unwrap();
    assert_eq!(source.fetch_requests(), [Some(Revision::new(7))]);
    assert!(recorder.is_empty(), "a current replica applied again");
    assert_eq!(h.local_revision(), Revision::new(7));

    source.publish(8, json!("fresh"));
    h.wait_for_revision(Revision::new(8))
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(json!("fresh")));
}

#[tokio::test(start_paused = true)]
async fn a_source_behind_the_replica_is_adopted_on_resync_only() {
    // The replica holds 42; the source restarted without its state.
    let source = ScriptedSource::new(3, json!("restarted"));
    let recorder = Recorder::with_data();
    let h = SyncHandle::from_parts(topic(), source.clone(), source.clone(), recorder.clone())
        .initial_revision(Revision::new(42))
        .build();
    h.start().await.unwrap();
    assert_eq!(recorder.revisions(), [Revision::new(3)]);
    assert_eq!(h.local_revision(), Revision::new(3));

    // From there, invalidations work again.
    source.publish(4, json!("next"));
    h.wait_for_revision(Revision::new(4))
        .within_limit()
        .await
        .unwrap();

    // An invalidation-driven refresh never goes backwards...
    source.set(2, json!("older"));
    source.emit(&event(5));
    settle().await;
    assert_eq!(h.local_revision(), Revision::new(4));
    // ...nor does a manual refresh; a reconnect does.
    h.refresh().await.unwrap();
    assert_eq!(h.local_revision(), Revision::new(4));
    for sink in source.sinks() {
        sink.connection_restored();
    }
    settle().await;
    assert_eq!(h.local_revision(), Revision::new(2));
    assert_eq!(recorder.last_data(), Some(json!("older")));
}
