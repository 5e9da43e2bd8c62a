//! One connection's session: the handshake, then requests until the peer
//! leaves; per-topic ordering, limits, and the answers.

use super::*;

/// Counts a connection while it lives; refused when the server is full.
pub(super) struct ConnectionSlot<'a>(&'a Shared);

impl<'a> ConnectionSlot<'a> {
    pub(super) fn take(shared: &'a Shared) -> Option<Self> {
        let limit = shared.config.max_connections;
        shared
            .open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(shared))
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs one connection: handshake, then requests until the peer leaves,
/// goes idle, breaks framing, cannot be written to, or the server shuts
/// down.
pub(super) async fn serve(
    shared: Arc<Shared>,
    mut frames: FrameStream,
    mut sink: FrameSink,
    peer: Peer,
) {
    let write_timeout = shared.config.write_timeout;
    let Some(_slot) = ConnectionSlot::take(&shared) else {
        shared
            .counters
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        crate::metrics::connection_refused();
        tracing::warn!(%peer, limit = shared.config.max_connections, "connection refused: too many connections");
        let busy = protocol::error(
            None,
            ErrorCode::TooManyConnections,
            "the server has as many connections as it may; try again later",
        );
        send_and_close(&mut sink, busy, write_timeout).await;
        return;
    };
    let (client_id, grant) = match handshake(&shared, &mut frames, &peer.address).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            if let Some(refusal) = refusal {
                send_and_close(&mut sink, refusal, write_timeout).await;
            }
            return;
        }
    };
    let welcome = protocol::encode(&ServerMessage::Welcome {
        version: PROTOCOL_VERSION,
        server_id: shared.config.server_id.clone(),
    });
    if send_within(&mut sink, welcome, write_timeout)
        .await
        .is_err()
    {
        return;
    }
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let connection = Arc::new(Connection::new());
    lock(&shared.connections).insert(id, connection.clone());
    crate::metrics::connection_opened(peer.transport);
    tracing::debug!(connection = id, %peer, %client_id, "client connected");

    // Closed by the writer when the connection cannot be written to.
    let unwritable = CancellationToken::new();
    let (answers, queue) = mpsc::channel(shared.config.max_requests_in_flight.max(1) * 2);
    // Every log line of this connection, its requests' included, carries
    // who it is: one client's trouble can be followed.
    let span = tracing::info_span!(
        "connection",
        connection = id,
        transport = peer.transport,
        peer = %peer,
        client = %client_id,
    );
    // Not instrumented: entering the span at every poll of every writer
    // cost 1.6 % of the hub's CPU in a fan-out; its one log line names the
    // span as its parent instead.
    let writer = tokio::spawn(write_loop(
        shared.clone(),
        connection.clone(),
        sink,
        queue,
        unwritable.clone(),
        peer.clone(),
        span.clone(),
    ));
    let mut session = Session {
        shared: shared.clone(),
        id,
        connection,
        grant,
        client_id,
        transport: peer.transport,
        subscriptions: HashSet::new(),
        answers,
        budget: Arc::new(Semaphore::new(
            shared
                .config
                .max_queued_bytes_per_connection
                .clamp(1, Semaphore::MAX_PERMITS),
        )),
        unwritable,
    };
    let goodbye = session
        .read_loop(&mut frames)
        .instrument(span.clone())
        .await;
    for topic in &session.subscriptions {
        shared.leave(topic, id);
    }
    crate::metrics::subscriptions_changed(peer.transport, -(session.subscriptions.len() as f64));
    if let Some(goodbye) = goodbye {
        session.queue(goodbye).await;
    }
    drop(session);
    let _ = writer.await;
    lock(&shared.connections).remove(&id);
    crate::metrics::connection_closed(peer.transport);
    tracing::debug!(connection = id, %peer, "client disconnected");
}

/// Reads `hello`. `Err(Some(frame))`: refused with that answer;
/// `Err(None)`: the peer left or the server is stopping.
pub(super) async fn handshake(
    shared: &Shared,
    frames: &mut FrameStream,
    peer: &str,
) -> Result<(String, Grant), Option<Bytes>> {
    let first = tokio::select! {
        () = shared.shutdown.cancelled() => return Err(None),
        first = tokio::time::timeout(shared.config.handshake_timeout, frames.next()) => first,
    };
    let refuse = |code, message: &str| Err(Some(protocol::error(None, code, message)));
    let frame = match first {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(FrameError::TooLarge))) => {
            return refuse(ErrorCode::TooLarge, "frame larger than the limit");
        }
        Ok(Some(Err(FrameError::InvalidUtf8))) => {
            return refuse(ErrorCode::BadRequest, "text frame is not valid UTF-8");
        }
        Ok(_) => return Err(None),
        Err(_) => {
            return refuse(
                ErrorCode::NotAuthenticated,
                "no hello within the handshake timeout",
            );
        }
    };
    match ClientMessage::decode(&frame) {
        Ok(ClientMessage::Hello {
            version,
            client_id,
            token,
        }) => {
            let max = shared.config.max_field_bytes;
            if version != PROTOCOL_VERSION {
                refuse(
                    ErrorCode::UnsupportedVersion,
                    &format!(
                        "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
                    ),
                )
            } else if let Some(what) = over_limit(
                &[
                    ("clientId", Some(client_id.as_str())),
                    ("token", token.as_ref().map(Secret::expose)),
                ],
                max,
            ) {
                refuse(ErrorCode::TooLarge, &what)
            } else if let Some(grant) = shared
                .access
                .authenticate(token.as_ref().map(Secret::expose))
            {
                Ok((client_id, grant))
            } else {
                tracing::warn!(%peer, %client_id, "rejected: bad token");
                refuse(ErrorCode::Unauthorized, "missing or invalid token")
            }
        }
        Ok(_) => refuse(
            ErrorCode::NotAuthenticated,
            "the first message must be hello",
        ),
        Err(e) => refuse(ErrorCode::BadRequest, &format!("expected hello: {e}")),
    }
}

/// The first of `fields` longer than `max` bytes, described.
pub(super) fn over_limit(fields: &[(&str, Option<&str>)], max: usize) -> Option<String> {
    fields.iter().find_map(|(name, value)| {
        let len = value.map_or(0, |v| v.len());
        (len > max).then(|| format!("{name} is {len} bytes, over the limit of {max}"))
    })
}

pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    pub(super) connection: Arc<Connection>,
    pub(super) grant: Grant,
    pub(super) client_id: String,
    /// The metrics label of the connection's transport.
    pub(super) transport: &'static str,
    pub(super) subscriptions: HashSet<Topic>,
    pub(super) answers: mpsc::Sender<Box<Queued>>,
    /// Room for this connection's queued answers, in bytes.
    pub(super) budget: Arc<Semaphore>,
    pub(super) unwritable: CancellationToken,
}

impl Drop for Session {
    /// However the session ends (also cancelled), its writer writes what
    /// was queued and closes.
    fn drop(&mut self) {
        self.connection.session_ended();
    }
}

pub(super) type Answer = Result<Bytes, Bytes>;

/// A request being handled: the topic it concerns and its answer.
pub(super) type InFlight = Pin<Box<dyn Future<Output = (Option<Topic>, Bytes)> + Send>>;

impl Session {
    /// Queues an answer for the writer once there is room for it; `false`
    /// when the connection is closing.
    pub(super) async fn queue(&self, frame: Bytes) -> bool {
        let frame = if frame.len() > self.shared.config.max_frame_bytes {
            // Never hand the codec a frame it cannot send.
            tracing::error!(
                len = frame.len(),
                "an answer is larger than the frame limit; sending an error instead"
            );
            protocol::error(None, ErrorCode::Internal, "answer too large to send")
        } else {
            frame
        };
        let config = &self.shared.config;
        let room = |budget: &Arc<Semaphore>, size: usize| {
            // One answer may take the whole budget, never more: it always fits.
            let n = frame.len().clamp(1, size.clamp(1, Semaphore::MAX_PERMITS));
            budget
                .clone()
                .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        };
        let acquired = async {
            let own = room(&self.budget, config.max_queued_bytes_per_connection)
                .await
                .ok()?;
            let all = room(&self.shared.queue_budget, config.max_queued_bytes)
                .await
                .ok()?;
            Some((own, all))
        };
        let room = tokio::select! {
            room = acquired => room,
            () = self.unwritable.cancelled() => None,
        };
        let Some(room) = room else { return false };
        let queued = self
            .answers
            .send(Box::new(Queued { frame, _room: room }))
            .await
            .is_ok();
        self.connection.answer_queued();
        queued
    }

    /// Handles requests; `set`s run concurrently (requests on one topic in
    /// order), answers are queued in request order. Returns the last
    /// message to send before closing, if any.
    pub(super) async fn read_loop(&mut self, frames: &mut FrameStream) -> Option<Bytes> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let max_in_flight = config.max_requests_in_flight.max(1);
        let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        // Requests in flight per topic, so a later one on the same topic
        // waits for them: per topic, requests take effect in order.
        let mut busy: HashMap<Topic, usize> = HashMap::new();
        // One timer for the connection, pushed back lazily: arming a new
        // one for every frame costs more than the frame's own work.
        let mut heard = Instant::now();
        let idle = tokio::time::sleep(config.idle_timeout);
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(idle, shutdown);
        loop {
            let next = tokio::select! {
                biased;
                () = self.unwritable.cancelled() => return None,
                Some((topic, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                    release(&mut busy, topic.as_ref());
                    if !self.queue(answer).await {
                        return None;
                    }
                    continue;
                }
                () = &mut shutdown => {
                    // Writes in flight are committed: answer them first.
                    while let Some((_, answer)) = in_flight.next().await {
                        if !self.queue(answer).await {
                            return None;
                        }
                    }
                    return Some(protocol::error(None, ErrorCode::ShuttingDown, "server is shutting down"));
                }
                () = &mut idle => {
                    let deadline = heard + config.idle_timeout;
                    if deadline <= Instant::now() && in_flight.is_empty() {
                        return Some(protocol::error(
                            None,
                            ErrorCode::IdleTimeout,
                            "no message within the idle timeout",
                        ));
                    }
                    idle.as_mut().reset(deadline.max(Instant::now() + config.idle_timeout / 4));
                    continue;
                }
                next = frames.next(), if in_flight.len() < max_in_flight => next,
            };
            heard = Instant::now();
            let frame = match next {
                None | Some(Err(FrameError::Closed)) => return None,
                Some(Err(FrameError::TooLarge)) => {
                    return Some(protocol::error(
                        None,
                        ErrorCode::TooLarge,
                        format!("frame larger than {} bytes", config.max_frame_bytes),
                    ));
                }
                Some(Err(FrameError::InvalidUtf8)) => {
                    return Some(protocol::error(
                        None,
                        ErrorCode::BadRequest,
                        "text frame is not valid UTF-8",
                    ));
                }
                Some(Err(FrameError::Io(e))) => {
                    tracing::debug!(error = %e, "read failed");
                    return None;
                }
                Some(Ok(frame)) => frame,
            };
            let message = match ClientMessage::decode(&frame) {
                Ok(message) => message,
                Err(e) => {
                    let answer = classify_bad_frame(&frame, &e);
                    in_flight.push_back(Box::pin(std::future::ready((None, answer))));
                    continue;
                }
            };
            // Per topic, in order: wait for the topic's earlier requests.
            if let Some(topic) = message_topic(&message)
                && busy.contains_key(topic)
            {
                while busy.contains_key(topic) {
                    let Some((done, answer)) = in_flight.next().await else {
                        break;
                    };
                    release(&mut busy, done.as_ref());
                    if !self.queue(answer).await {
                        return None;
                    }
                }
            }
            let kind = message_kind(&message);
            let span = tracing::debug_span!(
                "request",
                id = message_id(&message),
                kind,
                topic = message_topic(&message),
            );
            let started = Instant::now();
            // Boxed: the largest future of the loop, which would otherwise
            // be part of every idle connection's task.
            let handled = Box::pin(self.handle(message))
                .instrument(span.clone())
                .await;
            if let Some(topic) = &handled.topic {
                *busy.entry(topic.clone()).or_default() += 1;
            }
            let topic = handled.topic;
            let answer = handled.answer;
            in_flight.push_back(Box::pin(
                async move {
                    let answer = answer.await;
                    let elapsed = started.elapsed();
                    crate::metrics::request_done(kind, elapsed);
                    tracing::debug!(elapsed_us = elapsed.as_micros() as u64, "answered");
                    (topic, answer)
                }
                .instrument(span),
            ));
        }
    }

    pub(super) async fn handle(&mut self, message: ClientMessage) -> Handled {
        // On a shared storage another hub may have created the topic.
        if let ClientMessage::Get { topic, .. } | ClientMessage::Subscribe { topic, .. } = &message
            && self.shared.hub.shares_storage()
            && let Ok(topic) = Topic::new(topic)
            && !self.shared.hub.is_open(&topic)
        {
            let _ = self.shared.hub.open_if_stored(&topic).await;
        }
        let now = |answer: Answer| Handled::now(answer.unwrap_or_else(|e| e));
        match message {
            ClientMessage::Hello { .. } => now(Err(protocol::error(
                None,
                ErrorCode::BadRequest,
                "already said hello",
            ))),
            ClientMessage::Ping { id } => now(Ok(protocol::encode(&ServerMessage::Pong { id }))),
            ClientMessage::Status { id } => now(Ok(protocol::encode(&ServerMessage::Status {
                id,
                status: self.shared.status(&self.grant),
            }))),
            ClientMessage::Subscribe {
                id,
                topic,
                inline,
                delta,
            } => now(self.subscribe(id, &topic, inline, delta).await),
            ClientMessage::Unsubscribe { id, topic } => now(self.unsubscribe(id, &topic)),
            ClientMessage::Get {
                id,
                topic,
                if_newer_than,
            } => now(self.get(id, &topic, if_newer_than.as_deref())),
            ClientMessage::Set {
                id,
                topic,
                data,
                expected_revision,
                source_id,
            } => match self.prepare_set(id, &topic, expected_revision.as_deref(), source_id) {
                Ok((topic, expected, source_id)) => {
                    let shared = self.shared.clone();
                    Handled {
                        topic: Some(topic.clone()),
                        answer: Box::pin(async move {
                            commit(&shared, id, topic, &data, expected, source_id)
                                .await
                                .unwrap_or_else(|e| e)
                        }),
                    }
                }
                Err(error) => Handled::now(error),
            },
        }
    }

    pub(super) fn readable(&self, id: u64, topic: &str) -> Result<Topic, Bytes> {
        let topic = parse_topic(id, topic)?;
        if !self.grant.can_read(&topic) {
            return Err(forbidden(id, "read", &topic));
        }
        Ok(topic)
    }

    pub(super) async fn subscribe(
        &mut self,
        id: u64,
        topic: &str,
        inline: bool,
        delta: bool,
    ) -> Answer {
        let topic = self.readable(id, topic)?;
        let current = self
            .shared
            .hub
            .get_json(&topic)
            .map_err(|e| hub_error(id, &e))?;
        // Subscribing again (the client's probe) may change `inline`.
        let member = Member {
            connection: self.connection.clone(),
            inline,
            delta,
        };
        self.shared
            .join(&topic, self.id, member)
            .await
            .map_err(|e| protocol::error(Some(id), ErrorCode::UnknownTopic, e.to_string()))?;
        if self.subscriptions.insert(topic.clone()) {
            crate::metrics::subscriptions_changed(self.transport, 1.0);
        }
        Ok(protocol::encode(&ServerMessage::Subscribed {
            id,
            topic,
            revision: current.revision,
        }))
    }

    pub(super) fn unsubscribe(&mut self, id: u64, topic: &str) -> Answer {
        let topic = parse_topic(id, topic)?;
        if self.subscriptions.remove(&topic) {
            self.shared.leave(&topic, self.id);
            crate::metrics::subscriptions_changed(self.transport, -1.0);
        }
        self.connection.forget(&topic);
        Ok(protocol::encode(&ServerMessage::Ok { id, revision: None }))
    }

    pub(super) fn get(&self, id: u64, topic: &str, if_newer_than: Option<&str>) -> Answer {
        let topic = self.readable(id, topic)?;
        let known = if_newer_than.map(|r| parse_revision(id, r)).transpose()?;
        let snapshot = self
            .shared
            .hub
            .get_json(&topic)
            .map_err(|e| hub_error(id, &e))?;
        if known.is_some_and(|known| known >= snapshot.revision) {
            return Ok(protocol::encode(&ServerMessage::NotModified {
                id,
                topic,
                revision: snapshot.revision,
            }));
        }
        if snapshot.data.len() > self.shared.config.max_snapshot_bytes {
            return Err(protocol::error(
                Some(id),
                ErrorCode::TooLarge,
                format!(
                    "snapshot of {} bytes exceeds the limit of {}",
                    snapshot.data.len(),
                    self.shared.config.max_snapshot_bytes
                ),
            ));
        }
        let counters = &self.shared.counters;
        counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        crate::metrics::snapshot_sent();
        counters
            .snapshot_bytes_sent
            .fetch_add(snapshot.data.len() as u64, Ordering::Relaxed);
        if self.subscriptions.contains(&topic) {
            self.connection.answered(&topic, snapshot.revision);
        }
        Ok(protocol::encode_snapshot(
            id,
            &topic,
            snapshot.revision,
            &snapshot.data,
        ))
    }

    /// Checks a `set` before it runs: topic, permission, revision, fields.
    pub(super) fn prepare_set(
        &self,
        id: u64,
        topic: &str,
        expected: Option<&str>,
        source_id: Option<String>,
    ) -> Result<(Topic, Option<Revision>, String), Bytes> {
        let topic = parse_topic(id, topic)?;
        if !self.grant.can_write(&topic) {
            return Err(forbidden(id, "write", &topic));
        }
        let expected = expected.map(|r| parse_revision(id, r)).transpose()?;
        let max = self.shared.config.max_field_bytes;
        if let Some(what) = over_limit(&[("sourceId", source_id.as_deref())], max) {
            return Err(protocol::error(Some(id), ErrorCode::TooLarge, what));
        }
        let source_id = source_id.unwrap_or_else(|| self.client_id.clone());
        Ok((topic, expected, source_id))
    }
}

/// A handled request: the topic it concerns, and its answer (ready, or a
/// write being committed).
pub(super) struct Handled {
    pub(super) topic: Option<Topic>,
    pub(super) answer: Pin<Box<dyn Future<Output = Bytes> + Send>>,
}

impl Handled {
    pub(super) fn now(answer: Bytes) -> Self {
        Handled {
            topic: None,
            answer: Box::pin(std::future::ready(answer)),
        }
    }
}

/// The topic a request concerns, for per-topic ordering.
/// The request id, for the request's span.
pub(super) fn message_id(message: &ClientMessage) -> Option<u64> {
    match message {
        ClientMessage::Hello { .. } => None,
        ClientMessage::Subscribe { id, .. }
        | ClientMessage::Unsubscribe { id, .. }
        | ClientMessage::Get { id, .. }
        | ClientMessage::Set { id, .. }
        | ClientMessage::Ping { id }
        | ClientMessage::Status { id } => Some(*id),
    }
}

/// The request type, as a metrics label.
pub(super) fn message_kind(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Hello { .. } => "hello",
        ClientMessage::Subscribe { .. } => "subscribe",
        ClientMessage::Unsubscribe { .. } => "unsubscribe",
        ClientMessage::Get { .. } => "get",
        ClientMessage::Set { .. } => "set",
        ClientMessage::Ping { .. } => "ping",
        ClientMessage::Status { .. } => "status",
    }
}

pub(super) fn message_topic(message: &ClientMessage) -> Option<&str> {
    match message {
        ClientMessage::Subscribe { topic, .. }
        | ClientMessage::Unsubscribe { topic, .. }
        | ClientMessage::Get { topic, .. }
        | ClientMessage::Set { topic, .. } => Some(topic),
        _ => None,
    }
}

pub(super) fn release(busy: &mut HashMap<Topic, usize>, topic: Option<&Topic>) {
    if let Some(topic) = topic
        && let Some(count) = busy.get_mut(topic)
    {
        *count -= 1;
        if *count == 0 {
            busy.remove(topic);
        }
    }
}

/// Commits a checked `set`, creating the topic when allowed.
pub(super) async fn commit(
    shared: &Shared,
    id: u64,
    topic: Topic,
    data: &RawValue,
    expected: Option<Revision>,
    source_id: String,
) -> Answer {
    let data = data.get().as_bytes();
    let limit = shared.config.max_snapshot_bytes;
    if data.len() > limit {
        return Err(protocol::error(
            Some(id),
            ErrorCode::TooLarge,
            format!("data of {} bytes exceeds the limit of {limit}", data.len()),
        ));
    }
    let hub = &shared.hub;
    if !hub.is_open(&topic) {
        if !shared.config.create_topics {
            return Err(hub_error(id, &HubError::UnknownTopic { topic }));
        }
        hub.json_topic(topic.as_str())
            .await
            .map_err(|e| hub_error(id, &e))?;
    }
    match hub
        .set_json_limited(&topic, data, expected, Some(source_id), limit)
        .await
    {
        Ok(revision) => {
            shared.counters.writes.fetch_add(1, Ordering::Relaxed);
            Ok(protocol::encode(&ServerMessage::Ok {
                id,
                revision: Some(revision),
            }))
        }
        Err(HubError::Conflict { current, .. }) => Ok(protocol::encode(&ServerMessage::Conflict {
            id,
            topic,
            current_revision: current,
        })),
        Err(e) => Err(hub_error(id, &e)),
    }
}

/// The error for a frame that does not decode: not a message at all, an
/// unknown type, or a known type with bad fields.
pub(super) fn classify_bad_frame(frame: &[u8], error: &serde_json::Error) -> Bytes {
    match serde_json::from_slice::<Envelope>(frame) {
        Err(e) => protocol::error(None, ErrorCode::BadRequest, format!("not a message: {e}")),
        Ok(envelope) if !CLIENT_MESSAGE_TYPES.contains(&envelope.kind.as_str()) => protocol::error(
            envelope.id,
            ErrorCode::UnknownMessage,
            format!("unknown message type `{}`", envelope.kind),
        ),
        Ok(envelope) => protocol::error(envelope.id, ErrorCode::BadRequest, error.to_string()),
    }
}

pub(super) fn parse_topic(id: u64, topic: &str) -> Result<Topic, Bytes> {
    Topic::new(topic).map_err(|e| protocol::error(Some(id), ErrorCode::InvalidTopic, e.to_string()))
}

pub(super) fn parse_revision(id: u64, revision: &str) -> Result<Revision, Bytes> {
    revision.parse().map_err(|e| {
        protocol::error(
            Some(id),
            ErrorCode::InvalidRevision,
            format!("`{revision}`: {e}"),
        )
    })
}

pub(super) fn forbidden(id: u64, what: &str, topic: &Topic) -> Bytes {
    protocol::error(
        Some(id),
        ErrorCode::Forbidden,
        format!("may not {what} topic `{topic}`"),
    )
}

/// A hub error as a client sees it: the code, and a message that never
/// names server paths (storage and damage details go to the log).
pub(super) fn hub_error(id: u64, error: &HubError) -> Bytes {
    let code = ErrorCode::from_hub(error);
    let message = match error {
        HubError::Storage { topic, .. } => {
            tracing::error!(error = %state_sync::ErrorChain(error), "storage failed");
            match topic {
                Some(topic) => format!("storage failed for `{topic}`; nothing was committed"),
                None => "storage failed; nothing was committed".to_owned(),
            }
        }
        HubError::Damaged { topic, .. } => format!(
            "topic `{topic}` is damaged and quarantined until an operator restores it; see the server log"
        ),
        _ => state_sync::ErrorChain(error).to_string(),
    };
    protocol::error(Some(id), code, message)
}
