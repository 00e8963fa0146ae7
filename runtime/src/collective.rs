//! Collectives of a tensor-parallel group: what the `AllReduce` and `AllGather` ops of a sharded
//! graph (`kiln build --tp N`) need from the ranks they run on.
//!
//! [`LocalGroup`] is the in-process implementation: one thread per rank, exchanging host
//! buffers. It is what the CPU executor runs sharded engines with, and the oracle for a
//! device implementation. Every rank adds the pieces in rank order, so all ranks hold
//! bit-identical sums. A rank that fails tells the others ([`Collective::abort`], also on a
//! panic): their pending and later collectives fail with a message naming it, so no rank
//! waits forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The collective operations of one rank of a group.
pub trait Collective: Send + Sync {
    /// This rank, `0..ranks()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn ranks(&self) -> usize;
    /// Sums `data` element-wise over the ranks, in place (every rank passes the same length).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), String>;
    /// Every rank's `data`, in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, String>;
    /// Marks this rank as failed with `why`: the other ranks' collectives fail, naming it.
    fn abort(&self, why: &str);
}

/// The state the ranks of a [`LocalGroup`] share.
struct Exchange {
    /// Each rank's deposited buffer of the current round.
    slots: Vec<Option<Vec<f32>>>,
    /// Ranks that reached the current barrier.
    arrived: usize,
    /// Barriers passed so far.
    generation: u64,
    /// The first failure, naming its rank.
    failed: Option<String>,
}

struct Shared {
    ranks: usize,
    state: Mutex<Exchange>,
    wake: Condvar,
}

/// One rank's handle on an in-process group (see [`LocalGroup::new`]).
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// A group of `ranks` ranks: one handle per rank, in rank order, to move into its thread.
    pub fn new(ranks: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            ranks,
            state: Mutex::new(Exchange {
                slots: vec![None; ranks],
                arrived: 0,
                generation: 0,
                failed: None,
            }),
            wake: Condvar::new(),
        });
        (0..ranks)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // A rank that panicked while holding the lock has aborted the group (see `Drop`); the
        // state itself stays consistent, so a poisoned lock is still usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until every rank has arrived, or one has failed.
    fn barrier<'a>(
        &'a self,
        mut g: MutexGuard<'a, Exchange>,
    ) -> Result<MutexGuard<'a, Exchange>, String> {
        if let Some(f) = &g.failed {
            return Err(f.clone());
        }
        let generation = g.generation;
        g.arrived += 1;
        if g.arrived == self.shared.ranks {
            g.arrived = 0;
            g.generation += 1;
            self.shared.wake.notify_all();
            return Ok(g);
        }
        loop {
            g = self
                .shared
                .wake
                .wait(g)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if g.generation != generation {
                return Ok(g);
            }
            if let Some(f) = &g.failed {
                return Err(f.clone());
            }
        }
    }

    /// Deposits `data`, waits for every rank's, and returns them all in rank order.
    fn exchange(&self, data: Vec<f32>) -> Result<Vec<Vec<f32>>, String> {
        let mut g = self.lock();
        g.slots[self.rank] = Some(data);
        let g = self.barrier(g)?;
        let all = g
            .slots
            .iter()
            .map(|s| s.clone().expect("every rank deposits before the barrier"))
            .collect();
        // Nobody deposits the next round's buffer before every rank has read this one.
        drop(self.barrier(g)?);
        Ok(all)
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.shared.ranks
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), String> {
        let all = self.exchange(data.to_vec())?;
        if let Some((r, p)) = all.iter().enumerate().find(|(_, p)| p.len() != data.len()) {
            return Err(format!(
                "all-reduce of {} values on rank {}, {} on rank {r}",
                data.len(),
                self.rank,
                p.len()
            ));
        }
        data.fill(0.0);
        for piece in &all {
            for (d, v) in data.iter_mut().zip(piece) {
                *d += v;
            }
        }
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, String> {
        self.exchange(data.to_vec())
    }
    fn abort(&self, why: &str) {
        let mut g = self.lock();
        if g.failed.is_none() {
            g.failed = Some(format!("rank {} failed: {why}", self.rank));
        }
        self.shared.wake.notify_all();
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort("its thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_and_all_gather_over_threads() {
        let got: Vec<(Vec<f32>, Vec<Vec<f32>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut x = vec![r, 10.0 * r];
                        g.all_reduce_sum(&mut x).unwrap();
                        // A second round reuses the slots.
                        let mut y = vec![1.0];
                        g.all_reduce_sum(&mut y).unwrap();
                        assert_eq!(y, vec![3.0]);
                        (x, g.all_gather(&[r]).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered) in got {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![vec![0.0], vec![1.0], vec![2.0]]);
        }
    }

    #[test]
    fn a_failed_rank_is_named_on_the_others_instead_of_a_hang() {
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        if g.rank() == 1 {
                            g.abort("cannot load weights");
                            return String::new();
                        }
                        g.all_reduce_sum(&mut [1.0]).unwrap_err()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errors[0], "rank 1 failed: cannot load weights");
        assert_eq!(errors[2], "rank 1 failed: cannot load weights");
    }
}
