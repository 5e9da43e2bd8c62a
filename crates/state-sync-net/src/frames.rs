//! Frames over each transport: length-delimited over local sockets, text
//! messages over WebSocket. Both become a stream and a sink of `Bytes`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::stream::SplitSink;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};

/// Incoming frames.
pub(crate) type FrameStream = Pin<Box<dyn Stream<Item = Result<Bytes, FrameError>> + Send>>;
/// Outgoing frames.
pub(crate) type FrameSink = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame larger than the limit")]
    TooLarge,
    #[error("text frame is not valid UTF-8")]
    InvalidUtf8,
    #[error("peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The 4-byte big-endian length prefix codec, with a size limit.
fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Bytes a local socket's reader starts with; a larger frame reserves room
/// for itself.
const LOCAL_READ_BUFFER: usize = 1024;

/// Length-delimited frames over a byte stream (Unix socket, named local socket).
pub(crate) fn length_delimited<R, W>(
    read: R,
    write: W,
    max_frame: usize,
) -> (FrameStream, FrameSink)
where
    R: AsyncRead + Send + 'static,
    W: AsyncWrite + Send + 'static,
{
    // tokio-util starts both buffers at 8 KiB, most of an idle
    // connection's memory; they grow to the frames actually sent.
    let frames =
        FramedRead::with_capacity(read, codec(max_frame), LOCAL_READ_BUFFER).map(|frame| {
            frame.map(BytesMut::freeze).map_err(|e| {
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
                {
                    FrameError::TooLarge
                } else {
                    FrameError::Io(e)
                }
            })
        });
    let mut sink = FramedWrite::new(write, codec(max_frame));
    *sink.write_buffer_mut() = BytesMut::new();
    (Box::pin(frames), Box::pin(sink))
}

/// Text messages over a WebSocket. A frame the peer got wrong closes the
/// connection with the WebSocket code for it: 1007 for invalid UTF-8, 1009
/// for a frame over the limit.
pub(crate) fn websocket<S>(socket: WebSocketStream<S>) -> (FrameStream, FrameSink)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = socket.split();
    let close_with: CloseWith = Arc::default();
    let reason = close_with.clone();
    let frames = stream.filter_map(move |message| {
        let reason = reason.clone();
        async move {
            let refuse = |code, why: &'static str, error| {
                *lock(&reason) = Some(CloseFrame {
                    code,
                    reason: why.into(),
                });
                Some(Err(error))
            };
            match message {
                Ok(Message::Text(text)) => Some(Ok(Bytes::from(text))),
                Ok(Message::Binary(bytes)) => Some(Ok(bytes)),
                Ok(Message::Close(_)) => Some(Err(FrameError::Closed)),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
                Err(tungstenite::Error::Capacity(_)) => {
                    refuse(CloseCode::Size, "frame too large", FrameError::TooLarge)
                }
                Err(tungstenite::Error::Utf8) => {
                    refuse(CloseCode::Invalid, "invalid UTF-8", FrameError::InvalidUtf8)
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    Some(Err(FrameError::Closed))
                }
                Err(e) => Some(Err(FrameError::Io(io::Error::other(e)))),
            }
        }
    });
    let sink = WebSocketSink {
        inner: sink,
        close_with,
    }
    .with(|frame: Bytes| async move {
        let text = Utf8Bytes::try_from(frame)
            .map_err(|e| tungstenite::Error::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        Ok::<_, tungstenite::Error>(Message::Text(text))
    })
    .sink_map_err(io::Error::other);
    (Box::pin(frames), Box::pin(sink))
}

/// The close frame to end a WebSocket with, set by the reading half.
type CloseWith = Arc<Mutex<Option<CloseFrame>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writing half of a WebSocket, closing with the reading half's close
/// code when it set one.
struct WebSocketSink<S> {
    inner: SplitSink<WebSocketStream<S>, Message>,
    close_with: CloseWith,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocketSink<S> {
    type Error = tungstenite::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.inner.start_send_unpin(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if lock(&self.close_with).is_some() {
            std::task::ready!(self.inner.poll_ready_unpin(cx))?;
            let frame = lock(&self.close_with).take();
            if let Some(frame) = frame {
                self.inner.start_send_unpin(Message::Close(Some(frame)))?;
            }
        }
        self.inner.poll_close_unpin(cx)
    }
}
