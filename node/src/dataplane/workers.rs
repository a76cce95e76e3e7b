//! The threads that carry traffic. Each worker is a single-threaded Tokio
//! runtime; a client connection, the backend connections it uses and its
//! tunnels all live on one worker, so a request never crosses threads (on a
//! work-stealing runtime every request woke the other thread, and the
//! context switches cost more than the proxying). Each worker accepts on a
//! listening socket of its own (SO_REUSEPORT), and serves what it accepts
//! unless another worker serves clearly fewer connections: the kernel's
//! hash spreads a few long-lived connections unevenly (36 and 28 of 64 is
//! usual), and HAProxy's listeners likewise pass a connection to a less
//! loaded thread.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::Context;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
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
    /// Client connections each worker serves now.
    load: Box<[AtomicUsize]>,
}

/// A client connection counted on its worker until dropped.
pub struct Placed {
    workers: Arc<Workers>,
    pub worker: usize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.workers.load[self.worker].fetch_sub(1, Relaxed);
    }
}

impl Workers {
    /// Starts `n` worker threads; they run until the process ends. Worker i
    /// runs on CPU `cpus[i]` when `cpus` is not empty (see the node config's
    /// `cpus`).
    pub fn start(n: usize, cpus: &[usize]) -> anyhow::Result<Workers> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let (pinned, pins) = std::sync::mpsc::channel();
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let cpu = cpus.get(i).copied();
            let pinned = pinned.clone();
            std::thread::Builder::new().name(format!("dataplane-{i}")).spawn(move || {
                let pin = cpu.map_or(Ok(()), pin_to);
                let failed = pin.is_err();
                let _ = pinned.send(pin.with_context(|| format!("cannot run data plane thread {i} on CPU {}", cpu.unwrap_or_default())));
                if failed {
                    return;
                }
                WORKER.with(|w| w.set(i));
                runtime.block_on(std::future::pending::<()>());
            })?;
        }
        for _ in 0..n {
            pins.recv().context("a data plane thread ended while starting")??;
        }
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(Workers { handles, load })
    }

    /// The worker to serve a connection accepted on worker `accepted`: that
    /// one, unless another serves clearly fewer connections (more than one
    /// and an eighth fewer: a hand-off wakes the other thread, so a small
    /// difference is left as it is).
    pub fn place(self: &Arc<Self>, accepted: usize) -> Placed {
        let accepted = accepted % self.load.len();
        let mine = self.load[accepted].load(Relaxed);
        let (least, fewest) = self.load.iter().map(|l| l.load(Relaxed)).enumerate().min_by_key(|(_, n)| *n).unwrap_or((accepted, mine));
        let worker = if mine > fewest + 1 + fewest / 8 { least } else { accepted };
        self.load[worker].fetch_add(1, Relaxed);
        Placed { workers: self.clone(), worker }
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

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_a_worker_that_serves_clearly_fewer() {
        let workers = Arc::new(Workers::start(2, &[]).unwrap());
        // Balanced: each worker keeps what it accepts.
        let first = workers.place(0);
        let second = workers.place(1);
        assert_eq!((first.worker, second.worker), (0, 1));
        // Two more on worker 0 stay there (3 against 1); the next it accepts
        // goes to worker 1.
        let more: Vec<Placed> = (0..2).map(|_| workers.place(0)).collect();
        assert_eq!(more.iter().map(|p| p.worker).collect::<Vec<_>>(), vec![0, 0]);
        assert_eq!(workers.place(0).worker, 1, "3 against 1 is clearly more");
        // A difference of one is left as it is.
        let kept = workers.place(1);
        assert_eq!(kept.worker, 1);
        // Connections that end are no longer counted.
        drop(more);
        assert_eq!(workers.load.iter().map(|l| l.load(Relaxed)).collect::<Vec<_>>(), vec![1, 2]);
    }

    fn my_cpus() -> Vec<usize> {
        crate::config::allowed_cpus().unwrap()
    }

    #[test]
    fn a_pinned_worker_runs_only_on_its_cpu_and_an_unpinned_one_anywhere() {
        let all = my_cpus();
        let last = *all.last().unwrap();
        let workers = Workers::start(2, &[last, last]).unwrap();
        let unpinned = Workers::start(1, &[]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for i in 0..2 {
                let cpus = workers.handles[i].spawn(async { my_cpus() }).await.unwrap();
                assert_eq!(cpus, vec![last], "worker {i} is pinned");
            }
            assert_eq!(unpinned.handles[0].spawn(async { my_cpus() }).await.unwrap(), all, "the kernel places it");
        });
        assert_eq!(my_cpus(), all, "the starting thread keeps its CPUs");
    }

    #[test]
    fn a_cpu_the_thread_cannot_use_fails_the_start() {
        let err = Workers::start(1, &[CpuSet::count() - 1]).err().expect("CPU 1023 does not exist here");
        assert!(format!("{err:#}").contains("cannot run data plane thread 0 on CPU 1023"), "{err:#}");
    }
}
