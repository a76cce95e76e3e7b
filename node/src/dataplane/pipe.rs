//! Copies bytes both ways between two streams until both sides are done.
//! A side that finishes sending is half-closed on the other (its write side
//! is shut down), so protocols that half-close keep working; the whole pipe
//! ends when nothing moved in either direction for the idle limit.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Counters that each direction adds its bytes to.
pub type Tally<'a> = &'a [&'a AtomicU64];

pub async fn pipe<A, B>(a: A, b: B, idle: Duration, a_to_b: Tally<'_>, b_to_a: Tally<'_>) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let copying =
        async { tokio::try_join!(copy_half(&mut ar, &mut bw, a_to_b, &last, start), copy_half(&mut br, &mut aw, b_to_a, &last, start)) };
    let watchdog = async {
        loop {
            let quiet = start.elapsed().saturating_sub(Duration::from_millis(last.load(Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        done = copying => done.map(|_| ()),
        () = watchdog => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}"))),
    }
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, tally: Tally<'_>, last: &AtomicU64, start: Instant) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the peer sees the end of this direction only.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        last.store(start.elapsed().as_millis() as u64, Relaxed);
        for counter in tally {
            counter.fetch_add(n as u64, Relaxed);
        }
    }
}
