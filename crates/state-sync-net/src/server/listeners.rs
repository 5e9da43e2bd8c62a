//! Where connections come from: the Unix, local and WebSocket listeners,
//! their accept loop, and the plain HTTP answers (the web page) on the
//! WebSocket port.

use super::*;

/// Bytes a WebSocket connection reads at a time.
const WEBSOCKET_READ_BUFFER: usize = 4 * 1024;
/// Bytes of outgoing frames a WebSocket connection gathers before writing;
/// a flush (after each batch) writes them anyway.
const WEBSOCKET_WRITE_BUFFER: usize = 16 * 1024;

impl Server {
    /// Listens on a Unix socket at `path` (mode `0600`: only this user can
    /// connect). Unix only; [`listen_local`](Self::listen_local) works
    /// everywhere. A stale socket file from a crashed server is replaced; a
    /// live one is an error. Returns the path.
    ///
    /// # Errors
    ///
    /// Binding fails, or another server is listening at `path`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens (a half-made
    /// socket file is removed or replaced by the next bind).
    #[cfg(unix)]
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> io::Result<PathBuf> {
        let path = path.as_ref().to_owned();
        let listener = crate::platform::bind_unix(&path).await?;
        lock(&self.shared.unix_paths).push(path.clone());
        tracing::info!(path = %path.display(), "listening on unix socket");
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, |shared, (stream, _)| {
            serve_unix_stream(shared, stream, "unix");
        });
        Ok(path)
    }

    /// Listens on a named local socket, through `interprocess`: a named
    /// pipe `\\.\pipe\<name>` on Windows, a socket in the abstract
    /// namespace on Linux (no file), a socket file under `/tmp` on other
    /// Unix systems. The same code serves on every platform. Unlike
    /// [`listen_unix`](Self::listen_unix), no file permission limits who
    /// connects: configure tokens. Returns the name.
    ///
    /// # Errors
    ///
    /// The name is invalid, or another server listens on it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens.
    pub async fn listen_local(&self, name: &str) -> io::Result<String> {
        use interprocess::local_socket::tokio::prelude::*;
        use interprocess::local_socket::{GenericNamespaced, ListenerOptions};
        let listener = ListenerOptions::new()
            .name(name.to_ns_name::<GenericNamespaced>()?)
            .create_tokio()?;
        tracing::info!(%name, "listening on local socket");
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, |shared, stream| {
            // A Unix domain socket on Unix, served as the Unix listener's are.
            #[cfg(unix)]
            {
                let interprocess::local_socket::tokio::Stream::UdSocket(stream) = stream;
                serve_unix_stream(shared, tokio::net::UnixStream::from(stream), "local");
            }
            #[cfg(not(unix))]
            {
                let (read, write) = tokio::io::split(stream);
                serve_byte_stream(shared, read, write, "local");
            }
        });
        Ok(name.to_owned())
    }

    /// Serves `html` to plain HTTP `GET /` requests on this server's
    /// WebSocket listeners (the same port), e.g. a live view of the hub
    /// built with the JavaScript client. Other paths get `404`. Without a
    /// page, plain HTTP gets `400`. The page is public: it must hold no
    /// secret and ask for the token itself.
    pub fn serve_web_page(&self, html: impl Into<Bytes>) {
        *lock(&self.shared.web_page) = Some(html.into());
    }

    /// Listens for WebSocket connections on `addr` (text frames, one JSON
    /// message each). Returns the bound address.
    ///
    /// # Errors
    ///
    /// Binding fails.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens.
    pub async fn listen_websocket(
        &self,
        addr: impl tokio::net::ToSocketAddrs,
    ) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "listening for websocket connections");
        // tungstenite allocates its read buffer eagerly, 128 KiB by default:
        // most of an idle connection's memory. Frames are small; a larger
        // frame is read in several turns.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WEBSOCKET_READ_BUFFER)
            .write_buffer_size(WEBSOCKET_WRITE_BUFFER)
            .max_message_size(Some(self.shared.config.max_frame_bytes))
            .max_frame_size(Some(self.shared.config.max_frame_bytes));
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, move |shared, (stream, peer)| {
            // Small frames must not wait for Nagle's algorithm.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let shared = shared.clone();
            shared.tasks.clone().spawn(async move {
                let upgrade = tokio::time::timeout(shared.config.handshake_timeout, async {
                    match classify_request(&stream).await {
                        HttpRequest::Upgrade => {}
                        HttpRequest::Broken => return None,
                        HttpRequest::Plain {
                            method,
                            path,
                            head_len,
                        } => {
                            let page = lock(&shared.web_page).clone();
                            let limit = shared.config.write_timeout;
                            answer_plain_http(stream, (method, path, head_len), page, limit).await;
                            return None;
                        }
                    }
                    Some(tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)).await)
                })
                .await;
                let upgrade = match upgrade {
                    Ok(Some(upgrade)) => Ok(upgrade),
                    Ok(None) => return,
                    Err(elapsed) => Err(elapsed),
                };
                match upgrade {
                    Ok(Ok(socket)) => {
                        let (frames, sink) = frames::websocket(socket);
                        let peer = Peer {
                            transport: "websocket",
                            address: peer.to_string(),
                        };
                        serve(shared, frames, sink, peer).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "websocket upgrade failed")
                    }
                    Err(_) => tracing::debug!(%peer, "websocket upgrade timed out"),
                }
            });
        });
        Ok(local)
    }
}

/// What a new connection on the WebSocket port asks for.
pub(super) enum HttpRequest {
    /// A WebSocket upgrade: left unread for the handshake.
    Upgrade,
    /// A plain HTTP request; its head is `head_len` bytes.
    Plain {
        method: String,
        path: String,
        head_len: usize,
    },
    /// Closed, or no complete head within 8 KiB.
    Broken,
}

/// Reads what the request head waiting on `stream` asks for. Peeks,
/// consuming nothing, until the head is complete (at most 8 KiB).
pub(super) async fn classify_request(stream: &tokio::net::TcpStream) -> HttpRequest {
    let mut head = vec![0u8; 8192];
    loop {
        let n = match stream.peek(&mut head).await {
            Ok(0) | Err(_) => return HttpRequest::Broken,
            Ok(n) => n,
        };
        let seen = &head[..n];
        let end = seen.windows(4).position(|w| w == b"\r\n\r\n");
        if end.is_none() && n < head.len() {
            // Only part of the head has arrived; wait for more.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let text = String::from_utf8_lossy(seen).to_ascii_lowercase();
        let upgrade = text.lines().any(|line| {
            line.strip_prefix("upgrade:")
                .is_some_and(|v| v.trim() == "websocket")
        });
        if upgrade {
            return HttpRequest::Upgrade;
        }
        let Some(end) = end else {
            return HttpRequest::Broken;
        };
        let request_line = String::from_utf8_lossy(&seen[..end]);
        let mut parts = request_line.lines().next().unwrap_or("").split(' ');
        return HttpRequest::Plain {
            method: parts.next().unwrap_or("").to_owned(),
            path: parts.next().unwrap_or("").to_owned(),
            head_len: end + 4,
        };
    }
}

/// Answers a plain HTTP request on the WebSocket port: the web page (when
/// the server has one) for `GET /`, else a short refusal.
pub(super) async fn answer_plain_http(
    mut stream: tokio::net::TcpStream,
    request: (String, String, usize),
    page: Option<Bytes>,
    limit: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (method, path, head_len) = request;
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body): (&str, &str, Bytes) = match (&page, method.as_str(), path) {
        (Some(page), "GET" | "HEAD", "/" | "/index.html") => {
            ("200 OK", "text/html; charset=utf-8", page.clone())
        }
        (Some(_), "GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            Bytes::from_static(b"not found: the page is at /\n"),
        ),
        (Some(_), _, _) => (
            "405 Method Not Allowed",
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        ),
        (None, _, _) => (
            "400 Bad Request",
            "text/plain",
            Bytes::from_static(b"this port speaks the state-sync protocol over WebSocket\n"),
        ),
    };
    // The page keeps to itself: no framing by other sites, no sniffing, no
    // caching (it may show data), no referrer.
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nx-content-type-options: nosniff\r\n\
         x-frame-options: DENY\r\nreferrer-policy: no-referrer\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(limit, async {
        // Consume the head: closing with unread bytes would reset the
        // connection and lose the answer.
        let mut consumed = vec![0u8; head_len];
        stream.read_exact(&mut consumed).await?;
        stream.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            stream.write_all(&body).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// Accepts connections until shutdown, handing each to `handle`; a failed
/// accept is logged and retried shortly.
pub(super) fn spawn_accept_loop<S: Send + 'static>(
    shared: &Arc<Shared>,
    accepted: impl futures::Stream<Item = io::Result<S>> + Send + 'static,
    handle: impl Fn(&Arc<Shared>, S) + Send + 'static,
) {
    let shared = shared.clone();
    shared.tasks.clone().spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = shared.shutdown.cancelled() => break,
                next = accepted.next() => next,
            };
            match next {
                Some(Ok(stream)) => handle(&shared, stream),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => break,
            }
        }
    });
}

/// Serves a Unix domain socket, registered for reading only (see
/// [`super::unix_stream`]).
#[cfg(unix)]
fn serve_unix_stream(
    shared: &Arc<Shared>,
    stream: tokio::net::UnixStream,
    transport: &'static str,
) {
    match super::unix_stream::split(stream) {
        Ok((read, write)) => serve_byte_stream(shared, read, write, transport),
        Err(e) => tracing::warn!(error = %e, transport, "dropping a connection it cannot register"),
    }
}

/// Serves a byte-stream connection (Unix or local socket) with
/// length-delimited frames.
pub(super) fn serve_byte_stream<R, W>(
    shared: &Arc<Shared>,
    read: R,
    write: W,
    transport: &'static str,
) where
    R: tokio::io::AsyncRead + Send + 'static,
    W: tokio::io::AsyncWrite + Send + 'static,
{
    let (frames, sink) = frames::length_delimited(read, write, shared.config.max_frame_bytes);
    let peer = Peer {
        transport,
        address: transport.to_owned(),
    };
    shared
        .tasks
        .spawn(serve(shared.clone(), frames, sink, peer));
}

/// Where a connection comes from: its transport (a metrics label) and,
/// for logs, its address.
#[derive(Clone)]
pub(super) struct Peer {
    pub(super) transport: &'static str,
    pub(super) address: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}
