//! Ownership of background tasks: every spawned task has a guard that aborts it on drop.
//!
//! Dropping the owner (a server, a subscription, a `Master` handle) therefore stops the
//! work it started; nothing is left running fire-and-forget.

use tokio::task::JoinHandle;

/// Aborts the task when dropped.
#[derive(Debug)]
pub struct TaskGuard {
    name: &'static str,
    handle: JoinHandle<()>,
}

impl TaskGuard {
    /// Takes ownership of `handle`; `name` appears in logs.
    pub fn new(name: &'static str, handle: JoinHandle<()>) -> Self {
        Self { name, handle }
    }

    /// Waits for the task to end by itself, up to `limit`; aborts it after that.
    pub async fn join(mut self, limit: std::time::Duration) {
        if tokio::time::timeout(limit, &mut self.handle).await.is_err() {
            tracing::warn!(
                task = self.name,
                ?limit,
                "task did not stop in time; aborting it"
            );
        }
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.handle.is_finished() {
            tracing::trace!(task = self.name, "stopping task");
            self.handle.abort();
        }
    }
}
