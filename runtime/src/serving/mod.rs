//! Serving many requests at once: a continuous-batching [`scheduler`] over any
//! [`executor::BatchExecutor`] (the CPU executor with a paged cache, or the CUDA executor), KV
//! [`blocks`] with a prefix cache, and the [`engine_loop`] thread that owns them and talks to
//! the HTTP server and the offline benchmark through a handle.

pub mod blocks;
pub mod engine_loop;
pub mod executor;
pub mod scheduler;

pub use engine_loop::ServeHandle;
pub use executor::{BatchExecutor, CpuBatchExecutor, SeqStep};
pub use scheduler::{
    Event, Finish, RejectReason, Request, RequestId, Scheduler, SchedulerConfig, SchedulerStats,
    Sink, TokenLogprob,
};
