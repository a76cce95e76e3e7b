//! The threads that carry traffic. Each worker is a single-threaded Tokio
//! runtime; a client connection, the backend connections it uses and its
//! tunnels all live on one worker, so a request never crosses threads (on a
//! work-stealing runtime every request woke the other thread, and the
//! context switches cost more than the proxying). The listener hands each
//! accepted connection to the next worker in turn.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::runtime::Handle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the caller (0 outside the workers).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` worker threads; they run until the process ends.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new().name(format!("dataplane-{i}")).spawn(move || {
                WORKER.with(|w| w.set(i));
                runtime.block_on(std::future::pending::<()>());
            })?;
        }
        Ok(Workers { handles, next: AtomicUsize::new(0) })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether every worker runs a task within `limit`; the first that does
    /// not is named. A worker stuck in a busy loop or a blocking call fails.
    pub async fn responsive(&self, limit: std::time::Duration) -> Result<(), usize> {
        for (i, handle) in self.handles.iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            handle.spawn(async move {
                let _ = tx.send(());
            });
            if !matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(()))) {
                return Err(i);
            }
        }
        Ok(())
    }

    /// Runs `task` on the next worker in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }
}
