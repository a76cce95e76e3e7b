//! Copies bytes both ways between two streams until both sides are done.
//! A side that finishes sending is half-closed on the other (its write side
//! is shut down), so protocols that half-close keep working; the whole pipe
//! ends when nothing moved in either direction for the idle limit.
//!
//! Both directions are moved by one poll function over the two streams, with
//! one timer: no lock around each half of a stream and no join of two futures
//! on every wake-up.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Counters that each direction adds its bytes to.
pub type Tally<'a> = &'a [&'a AtomicU64];

const CHUNK: usize = 16 * 1024;

pub async fn pipe<A, B>(mut a: A, mut b: B, idle: Duration, a_to_b: Tally<'_>, b_to_a: Tally<'_>) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new(a_to_b);
    let mut down = Direction::new(b_to_a);
    let mut last = Instant::now();
    // Set once and moved only when it goes off: the time of the last
    // activity is kept, and the timer follows it then.
    let mut quiet = std::pin::pin!(tokio::time::sleep(idle));
    std::future::poll_fn(|cx| {
        let mut moved = false;
        let up_done = up.poll_move(&mut a, &mut b, cx, &mut moved)?.is_ready();
        let down_done = down.poll_move(&mut b, &mut a, cx, &mut moved)?.is_ready();
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        if moved {
            last = Instant::now();
        }
        while quiet.as_mut().poll(cx).is_ready() {
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}"))));
            }
            quiet.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// One direction: what was read from its source and not yet written to its
/// destination.
struct Direction<'a> {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The source ended: once the buffer is written, the destination is shut.
    eof: bool,
    /// The destination was shut: this direction is over.
    done: bool,
    /// Written since the last flush.
    unflushed: bool,
    tally: Tally<'a>,
}

impl<'a> Direction<'a> {
    fn new(tally: Tally<'a>) -> Self {
        Direction { buf: vec![0; CHUNK].into_boxed_slice(), pos: 0, end: 0, eof: false, done: false, unflushed: false, tally }
    }

    /// Moves what can be moved now; ready once the source ended and the
    /// destination was shut. `moved` is set when any byte went through.
    fn poll_move<R, W>(&mut self, src: &mut R, dst: &mut W, cx: &mut Context<'_>, moved: &mut bool) -> Poll<std::io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            if self.pos < self.end {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
                *moved = true;
                for counter in self.tally {
                    counter.fetch_add(n as u64, Relaxed);
                }
            } else if self.eof {
                // Half-close: the peer sees the end of this direction only.
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
            } else {
                let mut read = ReadBuf::new(&mut self.buf);
                if Pin::new(&mut *src).poll_read(cx, &mut read)?.is_pending() {
                    // Nothing more to send for now: what a buffering writer holds goes out.
                    if self.unflushed {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                match read.filled().len() {
                    0 => self.eof = true,
                    n => (self.pos, self.end) = (0, n),
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn each_direction_ends_on_its_own_and_is_counted() {
        let (client, mut client_end) = duplex(64);
        let (server, mut server_end) = duplex(64);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let piping = tokio::spawn(async move {
            let (up, down) = (&up, &down);
            let done = pipe(client, server, Duration::from_secs(5), &[up], &[down]).await;
            (done.is_ok(), up.load(Relaxed), down.load(Relaxed))
        });
        // More than one chunk and more than the duplex buffer, so writes wait on reads.
        let request = vec![7u8; 3 * CHUNK + 5];
        let writer = {
            let request = request.clone();
            tokio::spawn(async move {
                client_end.write_all(&request).await.unwrap();
                client_end.shutdown().await.unwrap();
                client_end
            })
        };
        let mut received = Vec::new();
        server_end.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, request, "the server gets every byte, then the end of the client's side");
        // The client's side is closed; the server still answers on its own.
        server_end.write_all(b"answer after the client's half-close").await.unwrap();
        server_end.shutdown().await.unwrap();
        let mut client_end = writer.await.unwrap();
        let mut answer = Vec::new();
        client_end.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after the client's half-close");
        let (ok, up, down) = piping.await.unwrap();
        assert!(ok, "both sides ended: the pipe ends without an error");
        assert_eq!((up, down), (request.len() as u64, 36));
    }

    #[tokio::test]
    async fn it_ends_after_the_idle_limit_with_no_traffic_and_not_before() {
        let idle = Duration::from_millis(300);
        let (client, mut client_end) = duplex(64);
        let (server, mut server_end) = duplex(64);
        let piping = tokio::spawn(async move {
            let none: [&AtomicU64; 0] = [];
            let done = pipe(client, server, idle, &none, &none).await;
            (done.map_err(|e| e.kind()), Instant::now())
        });
        // Traffic every 200 ms keeps it open past the limit.
        let mut byte = [0u8; 1];
        let mut last = Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Read before the byte goes in: the pipe's own time of it is no earlier.
            last = Instant::now();
            client_end.write_all(b"x").await.unwrap();
            server_end.read_exact(&mut byte).await.unwrap();
            assert!(!piping.is_finished(), "traffic within the limit keeps the pipe open");
        }
        let (ended, at) = piping.await.unwrap();
        assert_eq!(ended, Err(std::io::ErrorKind::TimedOut));
        let quiet = at - last;
        assert!(quiet >= idle && quiet < idle + Duration::from_secs(2), "ended {quiet:?} after the last byte, with a limit of {idle:?}");
    }
}
