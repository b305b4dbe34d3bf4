//! Behaviours stacked on any [`BlockDevice`], the way nbdkit stacks filters: each layer wraps
//! the device below it and is itself a `BlockDevice`, so every transport gets the same
//! behaviour by serving the top of the stack.
//!
//! ```text
//!   transport ──► Counting ──► Retrying ──► Recording ──► Volume (overlay ▸ index ▸ cache ▸ origin)
//!                 requests,    transient     first access
//!                 bytes,       failures      of each chunk
//!                 failures     retried       (trace file)
//! ```
//!
//! * [`Counting`] counts requests as the transport asked them (so a volume's internal
//!   read-modify-write reads are never counted as guest reads) and failures after retries.
//! * [`Retrying`] retries requests that failed with a transient kind (origin unreachable,
//!   corrupt transfer) with exponential backoff, for up to a deadline.
//! * [`Recording`] writes the first access to every chunk to a working-set trace.
//! * [`Holding`] (vamem, on top) keeps writes the device cannot take (disk full) in memory,
//!   serves them, and writes them down later: the kernel's writeback cannot be told.

mod counting;
mod holding;
mod recording;
mod retrying;

pub use counting::Counting;
pub use holding::Holding;
pub use recording::{untraced, Recording};
pub use retrying::{RetryPolicy, Retrying};
