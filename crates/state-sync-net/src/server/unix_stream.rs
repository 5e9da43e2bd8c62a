//! The hub's end of a Unix connection, registered with the runtime for
//! reading only; write readiness is asked for only while a write waits for
//! room.
//!
//! A Unix stream socket tells every writer waiting on it that it is
//! writable each time its peer reads from it, where TCP does so only after
//! a write found the buffer full. Registered for both, a hub that writes a
//! frame to 1 000 replicas is told 1 000 times that it may write again, and
//! wakes to scan those events: a fifth of the hub's CPU on Unix sockets,
//! and about 6 % of the replicas', whose reads run the wake-ups (see
//! `docs/BENCHMARKS.md`).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Bytes made ready for one read at most: a large frame is read in several
/// turns rather than zeroing its whole room before each read.
const MAX_READ: usize = 64 * 1024;

/// Splits an accepted connection into halves, the socket registered for
/// reading only.
pub(super) fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    // Non-blocking, as `into_std` leaves it; deregistered from the runtime.
    let stream = stream.into_std()?;
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    Ok((
        ReadHalf {
            socket: socket.clone(),
        },
        WriteHalf {
            socket,
            waiting: None,
        },
    ))
}

/// Registers `stream` with the runtime for `interest` only.
// `with_interest` is deprecated for types whose descriptor could change or
// close while registered; this `AsyncFd` owns the stream, whose descriptor
// stays open and the same until the `AsyncFd` drops it, and nothing here
// takes `&mut` access to it. Its replacement is `unsafe`, which this
// workspace forbids.
#[allow(deprecated)]
fn register(stream: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    AsyncFd::with_interest(stream, interest)
}

/// Reads through the read-only registration.
pub(super) struct ReadHalf {
    socket: Arc<AsyncFd<StdUnixStream>>,
}

/// Writes at once while the socket has room; otherwise waits for room on a
/// second descriptor of the socket, registered for writing only while it
/// waits.
pub(super) struct WriteHalf {
    socket: Arc<AsyncFd<StdUnixStream>>,
    waiting: Option<AsyncFd<StdUnixStream>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let room = buf.remaining().min(MAX_READ);
            let unfilled = buf.initialize_unfilled_to(room);
            match ready.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(read)) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness cleared: wait for the next event.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let Some(waiting) = &self.waiting else {
                match self.socket.get_ref().write(buf) {
                    Ok(written) => return Poll::Ready(Ok(written)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                        return Poll::Ready(Err(e));
                    }
                    Err(_) => {}
                }
                // Registered after the write found no room: the
                // registration reports room freed since, so none is missed.
                let second = self.socket.get_ref().try_clone()?;
                self.waiting = Some(register(second, Interest::WRITABLE)?);
                continue;
            };
            let mut ready = ready!(waiting.poll_write_ready(cx))?;
            match ready.try_io(|socket| socket.get_ref().write(buf)) {
                Ok(Ok(written)) => {
                    // Deregistered until a write finds no room again.
                    self.waiting = None;
                    return Poll::Ready(Ok(written));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.socket.get_ref().shutdown(Shutdown::Write) {
            // The peer may be gone already: shut down either way.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: the hub's end split, the peer's end plain.
    fn pair() -> ((ReadHalf, WriteHalf), tokio::net::UnixStream) {
        let (hub, peer) = tokio::net::UnixStream::pair().unwrap();
        (split(hub).unwrap(), peer)
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_a_shutdown_ends_the_peers_reads() {
        let ((mut read, mut write), mut peer) = pair();
        write.write_all(b"to the peer").await.unwrap();
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the peer");

        peer.write_all(b"to the hub").await.unwrap();
        let mut got = [0u8; 10];
        read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the hub");

        write.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read_to_end =
            tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut rest));
        assert_eq!(read_to_end.await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_write_that_finds_no_room_finishes_once_the_peer_reads() {
        let ((_read, mut write), mut peer) = pair();
        // Far more than a socket buffer holds, so some writes must wait.
        let sent: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                write.write_all(&sent).await.unwrap();
                write.shutdown().await.unwrap();
                write
            })
        };
        // Let the writer fill the buffer and wait before anything is read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the socket buffer held 8 MiB");
        let mut got = Vec::new();
        let read_all = tokio::time::timeout(Duration::from_secs(20), peer.read_to_end(&mut got));
        read_all.await.unwrap().unwrap();
        assert!(
            got == sent,
            "{} of {} bytes arrived intact",
            got.len(),
            sent.len()
        );
        let write = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
        assert!(write.waiting.is_none(), "still registered for writing");
    }

    #[tokio::test]
    async fn a_peer_that_closes_ends_the_hubs_reads_and_fails_its_writes() {
        let ((mut read, mut write), peer) = pair();
        drop(peer);
        let mut buf = [0u8; 16];
        let read_some = tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf));
        assert_eq!(read_some.await.unwrap().unwrap(), 0);
        let failed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = write.write_all(b"anyone?").await {
                    return e;
                }
            }
        });
        assert_eq!(failed.await.unwrap().kind(), io::ErrorKind::BrokenPipe);
    }
}
