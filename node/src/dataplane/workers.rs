//! The threads that carry traffic. Each worker is a single-threaded Tokio
//! runtime; a client connection, the backend connections it uses and its
//! tunnels all live on one worker, so a request never crosses threads (on a
//! work-stealing runtime every request woke the other thread, and the
//! context switches cost more than the proxying). Each worker accepts on a
//! listening socket of its own (SO_REUSEPORT), and serves what it accepts
//! unless another worker has served clearly fewer connections for a while:
//! the kernel's hash spreads a few long-lived connections unevenly (36 and
//! 28 of 64 is usual), and HAProxy's listeners likewise pass a connection to
//! a less loaded thread. Short connections need no such help: the hash
//! spreads them evenly on average, and their counts swing too fast for a
//! hand-off (which wakes the other thread) to be worth it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use slab::Slab;
use smallvec::SmallVec;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// The client connections the worker on this thread serves. Each is
    /// entered and removed on its worker's thread: no lock on the way of
    /// a new connection.
    static CONNS: RefCell<Conns> = RefCell::default();
}

/// The index of the worker running the caller (0 outside the workers).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// How long a worker's load is remembered when placing a connection: a
/// difference must last about this long to move connections. Short
/// connections (a few milliseconds each) swing the counts by several
/// connections many times within it and average out; a difference in
/// long-lived connections stays and is evened out by the next ones.
const LOAD_MEMORY: Duration = Duration::from_millis(100);

/// Each worker keeps a timer of its own due within this. Tokio wakes its
/// own thread (a write to an eventfd, and one more turn of the event loop)
/// whenever a timer is set earlier than every timer pending, or while none
/// is: with a new connection per request that was the case for about every
/// third request, as connections ending took their timers with them. With
/// this one pending, a connection's timeout longer than this (the defaults
/// are seconds) never comes first.
const TIMER_TICK: Duration = Duration::from_millis(500);

pub struct Workers {
    handles: Vec<Handle>,
    /// Client connections each worker serves now.
    load: Box<[AtomicUsize]>,
    /// Each worker's load averaged over about LOAD_MEMORY (f64 bits), as of
    /// `sampled` (nanoseconds since `epoch`). Samples are taken when a
    /// connection is placed; two threads sampling at once may lose one,
    /// which only makes the average a little older.
    average: Box<[AtomicU64]>,
    sampled: Box<[AtomicU64]>,
    epoch: Instant,
}

/// A worker's client connections: a slab, as one is added and removed for
/// every connection.
#[derive(Default)]
struct Conns {
    slab: Slab<Conn>,
    /// Numbers them, so that an entry is not taken for another's that
    /// came after it in the same place.
    numbered: u64,
}

/// A client connection as the node may need to close it: the address the
/// client reached, and the tasks that serve it (the connection's, then
/// that of the tunnel it may become).
struct Conn {
    number: u64,
    local: IpAddr,
    tasks: SmallVec<[AbortHandle; 2]>,
    closed: bool,
}

/// A client connection's entry among its worker's, so that the node can
/// close it (see [`Workers::close_on`]); made, used and dropped on the
/// worker's thread.
pub struct Entered(Tracker);

/// What tells a connection's worker which tasks serve it.
#[derive(Clone, Copy)]
pub struct Tracker {
    key: usize,
    number: u64,
}

impl Entered {
    /// Enters a connection that reached `local`.
    pub fn new(local: IpAddr) -> Entered {
        CONNS.with_borrow_mut(|conns| {
            conns.numbered += 1;
            let number = conns.numbered;
            let key = conns.slab.insert(Conn { number, local, tasks: SmallVec::new(), closed: false });
            Entered(Tracker { key, number })
        })
    }

    pub fn tracker(&self) -> Tracker {
        self.0
    }
}

impl Tracker {
    /// `task` serves this connection: closing it ends the task.
    pub fn track(self, task: AbortHandle) {
        let closed = CONNS.with_borrow_mut(|conns| match conns.slab.get_mut(self.key).filter(|c| c.number == self.number) {
            Some(conn) if !conn.closed => {
                conn.tasks.push(task);
                None
            }
            // Closed before its task was known.
            Some(_) => Some(task),
            None => None,
        });
        // Outside the borrow: what ending a task drops may leave the list.
        if let Some(task) = closed {
            task.abort();
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let Tracker { key, number } = self.0;
        CONNS.with_borrow_mut(|conns| {
            if conns.slab.get(key).is_some_and(|c| c.number == number) {
                conns.slab.remove(key);
            }
        })
    }
}

/// Closes the connections of this thread's worker that reached one of
/// `addrs`; returns how many it closed that were not closed before.
fn close_here(addrs: &[IpAddr]) -> usize {
    let (closed, tasks) = CONNS.with_borrow_mut(|conns| {
        let mut closed = 0;
        let mut tasks = Vec::new();
        for (_, conn) in conns.slab.iter_mut().filter(|(_, c)| !c.closed && addrs.contains(&c.local)) {
            conn.closed = true;
            tasks.extend(conn.tasks.drain(..));
            closed += 1;
        }
        (closed, tasks)
    });
    // Outside the borrow: what ending a task drops may leave the list.
    tasks.iter().for_each(AbortHandle::abort);
    closed
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
                runtime.block_on(async {
                    loop {
                        tokio::time::sleep(TIMER_TICK).await;
                    }
                });
            })?;
        }
        for _ in 0..n {
            pins.recv().context("a data plane thread ended while starting")??;
        }
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        let average = handles.iter().map(|_| AtomicU64::new(0f64.to_bits())).collect();
        let sampled = handles.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Workers { handles, load, average, sampled, epoch: Instant::now() })
    }

    /// Client connections (and the tunnels they became) open on all workers.
    pub fn open(&self) -> usize {
        self.load.iter().map(|l| l.load(Relaxed)).sum()
    }

    /// Closes every client connection that reached one of `addrs`, at once,
    /// whatever it is doing (see [`Entered`]); returns how many it closed
    /// that were not closed before.
    pub async fn close_on(&self, addrs: &[IpAddr]) -> usize {
        let mut closed = 0;
        for i in 0..self.len() {
            let addrs = addrs.to_vec();
            closed += self.spawn_on(i, async move { close_here(&addrs) }).await.unwrap_or(0);
        }
        closed
    }

    /// The worker to serve a connection accepted on worker `accepted`: that
    /// one, unless another has served clearly fewer connections for a while
    /// (on average over LOAD_MEMORY, more than one and an eighth fewer, and
    /// fewer now too: a hand-off wakes the other thread, so a small or
    /// passing difference is left as it is).
    pub fn place(self: &Arc<Self>, accepted: usize) -> Placed {
        self.place_at(accepted, Instant::now())
    }

    fn place_at(self: &Arc<Self>, accepted: usize, now: Instant) -> Placed {
        let accepted = accepted % self.load.len();
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let mine = self.average_load(accepted, now);
        let (mut least, mut fewest) = (accepted, mine);
        for i in (0..self.load.len()).filter(|&i| i != accepted) {
            let load = self.average_load(i, now);
            if load < fewest {
                (least, fewest) = (i, load);
            }
        }
        let clearly_fewer = mine > fewest + 1.0 + fewest / 8.0 && self.load[least].load(Relaxed) < self.load[accepted].load(Relaxed);
        let worker = if clearly_fewer { least } else { accepted };
        self.load[worker].fetch_add(1, Relaxed);
        Placed { workers: self.clone(), worker }
    }

    /// Worker `i`'s load averaged over about LOAD_MEMORY, brought up to `now`
    /// (nanoseconds since `epoch`) with its present count.
    fn average_load(&self, i: usize, now: u64) -> f64 {
        let count = self.load[i].load(Relaxed) as f64;
        let elapsed = now.saturating_sub(self.sampled[i].swap(now, Relaxed)) as f64;
        let before = f64::from_bits(self.average[i].load(Relaxed));
        let average = count + (before - count) * (-elapsed / LOAD_MEMORY.as_nanos() as f64).exp();
        self.average[i].store(average.to_bits(), Relaxed);
        average
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
    pub fn spawn_on<F, T>(&self, i: usize, task: F) -> tokio::task::JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
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

    fn loads(workers: &Workers) -> Vec<usize> {
        workers.load.iter().map(|l| l.load(Relaxed)).collect()
    }

    #[test]
    fn a_connection_goes_to_a_worker_that_has_served_clearly_fewer_for_a_while() {
        let workers = Arc::new(Workers::start(2, &[]).unwrap());
        let t0 = Instant::now();
        let later = |n: u32| t0 + n * LOAD_MEMORY * 10;
        // Balanced: each worker keeps what it accepts.
        let first = workers.place_at(0, t0);
        let second = workers.place_at(1, t0);
        assert_eq!((first.worker, second.worker), (0, 1));
        // Two more on worker 0 stay there (3 against 1, but only just now).
        let more: Vec<Placed> = (0..2).map(|_| workers.place_at(0, t0)).collect();
        assert_eq!(more.iter().map(|p| p.worker).collect::<Vec<_>>(), vec![0, 0]);
        // Once 3 against 1 has lasted, the next worker 0 accepts goes to worker 1.
        let moved = workers.place_at(0, later(1));
        assert_eq!(moved.worker, 1, "3 against 1 for a while is clearly more");
        // A difference of one is left as it is, however long it lasts.
        let kept = workers.place_at(1, later(2));
        assert_eq!(kept.worker, 1);
        assert_eq!(loads(&workers), vec![3, 3]);
        // Connections that end are no longer counted.
        drop(more);
        assert_eq!(loads(&workers), vec![1, 3]);
    }

    #[test]
    fn a_passing_surge_of_connections_stays_where_it_was_accepted() {
        let workers = Arc::new(Workers::start(2, &[]).unwrap());
        let t0 = Instant::now();
        // Ten each, for a while.
        let steady: Vec<Placed> = (0..20).map(|i| workers.place_at(i % 2, t0)).collect();
        assert_eq!(loads(&workers), vec![10, 10]);
        // Worker 0 accepts ten more within a millisecond, as short
        // connections come and go: they stay there, 20 against 10 now.
        let start = t0 + LOAD_MEMORY * 10;
        let surge: Vec<Placed> = (0..10u32).map(|i| workers.place_at(0, start + Duration::from_micros(100) * i)).collect();
        assert!(surge.iter().all(|p| p.worker == 0), "{:?}", surge.iter().map(|p| p.worker).collect::<Vec<_>>());
        assert_eq!(loads(&workers), vec![20, 10]);
        // Had the surge lasted, the next one would go to worker 1.
        assert_eq!(workers.place_at(0, start + LOAD_MEMORY * 10).worker, 1);
        // A worker that has fewer on average but more now gets nothing.
        drop(surge);
        let extra: Vec<Placed> = (0..5).map(|_| workers.place_at(1, start + LOAD_MEMORY * 10)).collect();
        assert!(extra.iter().all(|p| p.worker == 1));
        assert_eq!(loads(&workers), vec![10, 15]);
        assert_eq!(
            workers.place_at(0, start + LOAD_MEMORY * 10 + Duration::from_millis(1)).worker,
            0,
            "worker 1 has fewer on average but more now"
        );
        drop(steady);
    }

    #[tokio::test]
    async fn closing_an_address_ends_every_task_of_its_connections_and_no_other() {
        let workers = Arc::new(Workers::start(1, &[]).unwrap());
        let vip: IpAddr = "192.0.2.100".parse().unwrap();
        let (entered, other) = workers
            .spawn_on(0, async move {
                let forever = || tokio::spawn(std::future::pending::<()>());
                // A connection's task, then the tunnel it became; and a
                // connection on another address.
                let (on_vip, elsewhere) = (Entered::new(vip), Entered::new("127.0.0.1".parse().unwrap()));
                let (conn, tunnel, other) = (forever(), forever(), forever());
                on_vip.tracker().track(conn.abort_handle());
                on_vip.tracker().track(tunnel.abort_handle());
                elsewhere.tracker().track(other.abort_handle());
                ((on_vip, conn, tunnel), (elsewhere, other))
            })
            .await
            .unwrap();
        assert_eq!(workers.close_on(&[vip]).await, 1);
        let (on_vip, conn, tunnel) = entered;
        assert!(conn.await.unwrap_err().is_cancelled());
        assert!(tunnel.await.unwrap_err().is_cancelled());
        assert_eq!(workers.close_on(&[vip]).await, 0, "counted once");
        // A task made known after its connection was closed ends at once.
        let late = workers.spawn_on(0, std::future::pending::<()>());
        let handle = late.abort_handle();
        workers.spawn_on(0, async move { on_vip.tracker().track(handle) }).await.unwrap();
        assert!(late.await.unwrap_err().is_cancelled());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!other.1.is_finished(), "a connection on another address goes on");
        // Its entry goes with it, on its worker.
        workers.spawn_on(0, async move { drop(other) }).await.unwrap();
        let left = workers.spawn_on(0, async { CONNS.with_borrow(|c| c.slab.len()) }).await.unwrap();
        assert_eq!(left, 0);
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
