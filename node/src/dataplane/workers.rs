//! The threads that carry traffic. Each worker is a single-threaded Tokio
//! runtime; a client connection, the backend connections it uses and its
//! tunnels all live on one worker, so a request never crosses threads (on a
//! work-stealing runtime every request woke the other thread, and the
//! context switches cost more than the proxying). Each worker accepts on a
//! listening socket of its own (SO_REUSEPORT), so an accepted connection is
//! never handed from one thread to another either.

use std::cell::Cell;
use std::future::Future;

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
        Ok(Workers { handles })
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

    /// Runs `task` on worker `i` (modulo the number of workers).
    pub fn spawn_on<F>(&self, i: usize, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(task)
    }
}
