//! A connection's writer: answers and pending invalidations, each write
//! within the write timeout.

use futures::FutureExt;

use super::*;

/// Sends one frame within the write timeout.
pub(super) async fn send_within(
    sink: &mut FrameSink,
    frame: Bytes,
    limit: Duration,
) -> Result<(), String> {
    within(limit, sink.send(frame)).await
}

/// Runs a write within `limit`. Most writes complete at their first poll,
/// as the socket has room: those never touch the timer wheel (a timer
/// armed and cancelled per write per connection is a lock and an insert in
/// the runtime's timer, on every connection of every fan-out).
async fn within<F>(limit: Duration, write: F) -> Result<(), String>
where
    F: Future<Output = io::Result<()>>,
{
    let mut write = std::pin::pin!(write);
    let result = match write.as_mut().now_or_never() {
        Some(result) => Ok(result),
        // Polled again under the timeout, with the task's own waker.
        None => tokio::time::timeout(limit, write).await,
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!(
            "no write progress for {limit:?}: the peer is not reading"
        )),
    }
}

/// Sends a last frame and closes, both within the write timeout.
pub(super) async fn send_and_close(sink: &mut FrameSink, frame: Bytes, limit: Duration) {
    if send_within(sink, frame, limit).await.is_ok() {
        let _ = tokio::time::timeout(limit, sink.close()).await;
    }
}

/// An answer waiting to be written, holding its room in the queue budgets.
/// Queued boxed: the channel allocates its slots in blocks of 32 up front,
/// and a pointer per slot keeps that block small on every idle connection.
pub(super) struct Queued {
    pub(super) frame: Bytes,
    pub(super) _room: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Writes answers and pending invalidations until the session is over, each
/// write within the write timeout. A connection that cannot be written to
/// is closed, with the reason logged, never left silent.
pub(super) async fn write_loop(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    mut sink: FrameSink,
    mut answers: mpsc::Receiver<Box<Queued>>,
    unwritable: CancellationToken,
    peer: Peer,
    span: tracing::Span,
) {
    let counters = &shared.counters;
    let limit = shared.config.write_timeout;
    let mut batch: Vec<Pending> = Vec::new();
    let write_answer = async |sink: &mut FrameSink, queued: Box<Queued>| {
        crate::metrics::bytes_out(peer.transport, queued.frame.len());
        counters
            .bytes_sent
            .fetch_add(queued.frame.len() as u64, Ordering::Relaxed);
        send_within(sink, queued.frame, limit).await
    };
    // One wake-up for invalidations, answers and the session's end: the
    // answer queue is looked at only when an answer was queued.
    loop {
        connection.wake.notified().await;
        connection.take_pending(&mut batch);
        let mut result = Ok(());
        if !batch.is_empty() {
            let written = async {
                for Pending {
                    frame,
                    inlined,
                    delta,
                    ..
                } in batch.drain(..)
                {
                    counters.invalidations_sent.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::invalidation_sent(inlined);
                    crate::metrics::bytes_out(peer.transport, frame.len());
                    counters
                        .bytes_sent
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                    if delta {
                        counters.snapshots_as_deltas.fetch_add(1, Ordering::Relaxed);
                    }
                    if inlined > 0 {
                        counters.snapshots_inlined.fetch_add(1, Ordering::Relaxed);
                        counters
                            .snapshot_bytes_inlined
                            .fetch_add(inlined as u64, Ordering::Relaxed);
                    }
                    sink.feed(frame).await?;
                }
                sink.flush().await
            };
            result = within(limit, written).await;
        }
        // Read before the queue is drained: answers queued before the
        // session ended are all in it then.
        let ended = connection.session_ended.load(Ordering::Acquire);
        if result.is_ok() && (connection.answer_queued.swap(false, Ordering::AcqRel) || ended) {
            while let Ok(queued) = answers.try_recv() {
                result = write_answer(&mut sink, queued).await;
                if result.is_err() {
                    break;
                }
            }
        }
        if let Err(reason) = result {
            counters
                .connections_closed_unwritable
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(parent: &span, %peer, %reason, "closing the connection");
            unwritable.cancel();
            return;
        }
        if ended {
            break;
        }
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn a_write_ready_at_once_or_later_succeeds_and_one_that_never_progresses_times_out() {
        assert_eq!(within(LIMIT, async { Ok(()) }).await, Ok(()));

        // Not ready at the first poll: finished under the timeout, woken by
        // the task's own waker.
        let (done, written) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::sleep(LIMIT / 2).await;
            let _ = done.send(());
        });
        let later = async { written.await.map_err(io::Error::other) };
        assert_eq!(within(LIMIT, later).await, Ok(()));

        let failed = within(LIMIT, async { Err(io::Error::other("reset")) }).await;
        assert_eq!(failed, Err("write failed: reset".to_owned()));

        let started = Instant::now();
        let stalled = within(LIMIT, std::future::pending()).await;
        assert!(stalled.is_err_and(|e| e.contains("the peer is not reading")));
        assert_eq!(started.elapsed(), LIMIT);
    }
}
