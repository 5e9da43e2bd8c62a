//! Frames over each transport: length-delimited over local sockets, text
//! messages over WebSocket. Both become a stream and a sink of `Bytes`.

use std::io;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
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
    let frames = FramedRead::new(read, codec(max_frame)).map(|frame| {
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
    (
        Box::pin(frames),
        Box::pin(FramedWrite::new(write, codec(max_frame))),
    )
}

/// Text messages over a WebSocket.
pub(crate) fn websocket<S>(socket: WebSocketStream<S>) -> (FrameStream, FrameSink)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = socket.split();
    let frames = stream.filter_map(|message| async move {
        match message {
            Ok(Message::Text(text)) => Some(Ok(Bytes::from(text))),
            Ok(Message::Binary(bytes)) => Some(Ok(bytes)),
            Ok(Message::Close(_)) => Some(Err(FrameError::Closed)),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
            Err(tungstenite::Error::Capacity(_)) => Some(Err(FrameError::TooLarge)),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Some(Err(FrameError::Closed))
            }
            Err(e) => Some(Err(FrameError::Io(io::Error::other(e)))),
        }
    });
    let sink = sink
        .with(|frame: Bytes| async move {
            let text = Utf8Bytes::try_from(frame).map_err(|e| {
                tungstenite::Error::Io(io::Error::new(io::ErrorKind::InvalidData, e))
            })?;
            Ok::<_, tungstenite::Error>(Message::Text(text))
        })
        .sink_map_err(io::Error::other);
    (Box::pin(frames), Box::pin(sink))
}
