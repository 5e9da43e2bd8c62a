//! `statesync bench --baseline sockets`: the floor under any hub on this
//! machine. The same number of connections on the same kind of socket
//! (Unix, or loopback TCP for a WebSocket hub); on each write, a frame as
//! large as what the hub sent each replica is written to every connection
//! by one thread per core and read back by one polling thread per core
//! (`mio`: epoll on Linux). No protocol, no decoding, no engine, no async
//! runtime: what it costs is what the kernel charges for moving those
//! bytes, which no hub can avoid.

use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};

use crate::bench::{Applied, Convergence, Load};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a receiving thread waits for the next frame before the run is
/// declared stuck.
const STALL: Duration = Duration::from_secs(60);

/// Which sockets carry the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Unix stream sockets, as the hub's `--socket` and `--local`.
    #[cfg(unix)]
    Unix,
    /// Loopback TCP, under the hub's WebSocket.
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            #[cfg(unix)]
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// Runs the baseline under `load` (its document size aside), writing
/// `frame_bytes` to each connection per write; its figures as JSON.
///
/// # Errors
///
/// The sockets cannot be opened (e.g. too few file descriptors) or a
/// receiver saw nothing for 60 s.
pub(crate) async fn run(
    load: Load,
    transport: Transport,
    frame_bytes: usize,
) -> Result<Value, BoxError> {
    // Plain threads and blocking writes: off the runtime's threads.
    tokio::task::spawn_blocking(move || run_blocking(load, transport, frame_bytes)).await?
}

fn run_blocking(load: Load, transport: Transport, frame_bytes: usize) -> Result<Value, BoxError> {
    let Load {
        clients,
        writes,
        rate,
        ..
    } = load;
    let frame_bytes = frame_bytes.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (senders, receivers) = connect(transport, clients as usize)?;

    let logs: Vec<Applied<u32>> = (0..clients)
        .map(|_| Arc::new(Mutex::new(Vec::with_capacity(writes as usize))))
        .collect();
    let share = (clients as usize).div_ceil(threads);
    let mut reading = Vec::new();
    for (own, own_logs) in shares(receivers, share).into_iter().zip(logs.chunks(share)) {
        let own_logs = own_logs.to_vec();
        reading.push(std::thread::spawn(move || {
            receive(own, &own_logs, frame_bytes, writes)
        }));
    }

    // One sending thread per core, each told when a write starts.
    let frame = vec![b'x'; frame_bytes];
    let cpu_before = crate::bench::cpu_time();
    let mut sending = Vec::new();
    let mut starts = Vec::new();
    for mut own in shares(senders, share) {
        let (start, started) = mpsc::channel::<()>();
        starts.push(start);
        let frame = frame.clone();
        sending.push(std::thread::spawn(move || -> std::io::Result<()> {
            // A write that starts before the last one is out waits its
            // turn, as it would behind a hub's writers.
            while started.recv().is_ok() {
                for socket in &mut own {
                    socket.write_all(&frame)?;
                }
            }
            Ok(())
        }));
    }
    let began = Instant::now();
    let mut sent = Vec::with_capacity(writes as usize);
    for seq in 1..=writes {
        let due = began + Duration::from_secs_f64(f64::from(seq - 1) / f64::from(rate));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        sent.push((seq, Instant::now()));
        // A sender that stopped says why when joined, below.
        if starts.iter().any(|start| start.send(()).is_err()) {
            break;
        }
    }
    drop(starts);
    for thread in sending {
        thread.join().map_err(|_| "a sending thread panicked")??;
    }
    for thread in reading {
        thread.join().map_err(|_| "a receiving thread panicked")??;
    }
    let cpu = crate::bench::cpu_ms_since(cpu_before);
    let latency = Convergence::of(&sent, &logs);
    Ok(json!({
        "baseline": "plain sockets",
        "transport": transport.name(),
        "threads": threads,
        "clients": clients,
        "writes": writes,
        "rate_per_sec": rate,
        "frame_bytes": frame_bytes,
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
        "max_ms": latency.max_ms,
        "cpu_ms_per_write": cpu.map(|ms| crate::bench::per_write(ms, writes)),
    }))
}

/// `items` in consecutive shares of `share` (the last may be shorter).
fn shares<T>(mut items: Vec<T>, share: usize) -> Vec<Vec<T>> {
    let mut shares = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(share.min(items.len()));
        shares.push(std::mem::replace(&mut items, rest));
    }
    shares
}

/// One receiving thread: reads its connections as they become readable
/// and logs, per connection, when each whole frame arrived.
fn receive(
    mut sockets: Vec<Receiving>,
    logs: &[Applied<u32>],
    frame_bytes: usize,
    writes: u32,
) -> Result<(), BoxError> {
    let mut poll = Poll::new()?;
    for (i, socket) in sockets.iter_mut().enumerate() {
        socket.register(&poll, Token(i))?;
    }
    let total = frame_bytes * writes as usize;
    let mut received = vec![0usize; sockets.len()];
    let mut arrivals: Vec<Vec<(u32, Instant)>> =
        vec![Vec::with_capacity(writes as usize); sockets.len()];
    let mut unfinished = sockets.len();
    let mut events = Events::with_capacity(1024);
    let mut buffer = vec![0u8; 64 * 1024];
    while unfinished > 0 {
        poll.poll(&mut events, Some(STALL))?;
        if events.is_empty() {
            return Err("a plain-socket receiver saw nothing for 60 s".into());
        }
        for event in &events {
            let i = event.token().0;
            while received[i] < total {
                match sockets[i].read(&mut buffer) {
                    Ok(0) => return Err("a plain-socket sender closed early".into()),
                    Ok(n) => {
                        let frames_before = received[i] / frame_bytes;
                        received[i] += n;
                        let frames_now = received[i] / frame_bytes;
                        let now = Instant::now();
                        for frame in frames_before..frames_now {
                            arrivals[i].push((frame as u32 + 1, now));
                        }
                        if received[i] == total {
                            unfinished -= 1;
                        }
                        if n < buffer.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    for (log, arrived) in logs.iter().zip(arrivals) {
        if let Ok(mut log) = log.lock() {
            *log = arrived;
        }
    }
    Ok(())
}

/// The writing end of a connection: blocking.
enum Sending {
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Write for Sending {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            #[cfg(unix)]
            Sending::Unix(s) => s.write(buf),
            Sending::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The reading end of a connection: non-blocking, polled.
enum Receiving {
    #[cfg(unix)]
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Receiving {
    fn register(&mut self, poll: &Poll, token: Token) -> std::io::Result<()> {
        let registry = poll.registry();
        match self {
            #[cfg(unix)]
            Receiving::Unix(s) => registry.register(s, token, Interest::READABLE),
            Receiving::Tcp(s) => registry.register(s, token, Interest::READABLE),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            #[cfg(unix)]
            Receiving::Unix(s) => s.read(buf),
            Receiving::Tcp(s) => s.read(buf),
        }
    }
}

/// `clients` connected pairs on `transport`.
fn connect(
    transport: Transport,
    clients: usize,
) -> Result<(Vec<Sending>, Vec<Receiving>), BoxError> {
    let mut senders = Vec::with_capacity(clients);
    let mut receivers = Vec::with_capacity(clients);
    match transport {
        #[cfg(unix)]
        Transport::Unix => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("floor.sock");
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            for _ in 0..clients {
                let client = std::os::unix::net::UnixStream::connect(&path)?;
                let (server, _) = listener.accept()?;
                client.set_nonblocking(true)?;
                senders.push(Sending::Unix(server));
                receivers.push(Receiving::Unix(mio::net::UnixStream::from_std(client)));
            }
        }
        Transport::Tcp => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let address = listener.local_addr()?;
            for _ in 0..clients {
                let client = std::net::TcpStream::connect(address)?;
                let (server, _) = listener.accept()?;
                // As the hub sets on its WebSocket connections.
                server.set_nodelay(true)?;
                client.set_nonblocking(true)?;
                senders.push(Sending::Tcp(server));
                receivers.push(Receiving::Tcp(mio::net::TcpStream::from_std(client)));
            }
        }
    }
    Ok((senders, receivers))
}
