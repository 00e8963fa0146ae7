//! The scheduler's thread: it owns the executor and the scheduler, takes requests and aborts
//! from a channel, and steps while there is work. [`ServeHandle`] is the other end, cheap to
//! clone and usable from any thread (the HTTP handlers).

use super::scheduler::{
    check_request, RejectReason, Request, RequestId, Scheduler, SchedulerStats,
};
use super::BatchExecutor;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

enum Command {
    Add(Request),
    Abort(RequestId),
}

/// The handle of a running scheduler thread.
#[derive(Clone)]
pub struct ServeHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

struct Shared {
    stats: Mutex<SchedulerStats>,
    next_id: AtomicU64,
    draining: AtomicBool,
    max_seq_len: usize,
    has_tokenizer: bool,
    /// The last executor failure, if any.
    error: Mutex<Option<String>>,
}

impl ServeHandle {
    /// Starts the scheduler's thread, which makes its scheduler with `make` (so the executor
    /// and its GPU context live on that thread) and runs until every handle is dropped (or
    /// [`drain`](Self::drain) was called) and no request is left. Returns `make`'s error if it
    /// fails.
    pub fn spawn<E, F>(make: F) -> Result<(ServeHandle, JoinHandle<()>), String>
    where
        E: BatchExecutor + 'static,
        F: FnOnce() -> Result<(Scheduler<E>, bool), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || {
                let (sched, has_tokenizer) = match make() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared {
                    stats: Mutex::new(sched.stats()),
                    next_id: AtomicU64::new(1),
                    draining: AtomicBool::new(false),
                    max_seq_len: sched.max_seq_len(),
                    has_tokenizer,
                    error: Mutex::new(None),
                });
                let _ = ready_tx.send(Ok(shared.clone()));
                run(sched, rx, shared)
            })
            .map_err(|e| format!("cannot start the scheduler thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(shared)) => Ok((ServeHandle { tx, shared }, join)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the scheduler thread ended while starting".into()),
        }
    }

    /// A fresh request id.
    pub fn next_id(&self) -> RequestId {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The longest sequence (prompt plus generated) a request may reach.
    pub fn max_seq_len(&self) -> usize {
        self.shared.max_seq_len
    }

    /// Checks and queues a request. Its sink then gets every event, ending with `Finished` or
    /// `Failed`. Refused while draining.
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        if self.shared.draining.load(Ordering::Relaxed) {
            return Err(SubmitError::Draining);
        }
        check_request(&req, self.shared.max_seq_len, self.shared.has_tokenizer)
            .map_err(SubmitError::Rejected)?;
        self.tx
            .send(Command::Add(req))
            .map_err(|_| SubmitError::Stopped)
    }

    /// Aborts a request (no further events), freeing its KV blocks.
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Stops taking requests; the thread ends once the running and waiting ones are done.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        // Wake the thread if it is idle.
        let _ = self.tx.send(Command::Abort(0));
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// The scheduler's counters after its last step.
    pub fn stats(&self) -> SchedulerStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The last executor failure, if a step failed.
    pub fn last_error(&self) -> Option<String> {
        self.shared.error.lock().ok().and_then(|e| e.clone())
    }
}

/// A request the scheduler did not take.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Invalid for this engine.
    #[error(transparent)]
    Rejected(RejectReason),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Draining,
    /// The scheduler thread has ended.
    #[error("the scheduler has stopped")]
    Stopped,
}

fn run<E: BatchExecutor>(
    mut sched: Scheduler<E>,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
) {
    let mut senders_gone = false;
    loop {
        // Block for work when idle; otherwise take what has arrived and step.
        if sched.is_idle() {
            if senders_gone || shared.draining.load(Ordering::Relaxed) {
                // Requests sent before the drain may still be in the channel.
                match rx.try_recv() {
                    Ok(cmd) => apply(&mut sched, cmd),
                    Err(_) => break,
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => apply(&mut sched, cmd),
                    Err(_) => senders_gone = true,
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => apply(&mut sched, cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone = true;
                    break;
                }
            }
        }
        if let Err(e) = sched.step() {
            if let Ok(mut slot) = shared.error.lock() {
                *slot = Some(e.to_string());
            }
        }
        if let Ok(mut st) = shared.stats.lock() {
            *st = sched.stats();
        }
    }
}

fn apply<E: BatchExecutor>(sched: &mut Scheduler<E>, cmd: Command) {
    match cmd {
        Command::Add(req) => {
            // A refused request hears why through its sink.
            let _ = sched.add(req);
        }
        Command::Abort(id) => {
            sched.abort(id);
        }
    }
}
