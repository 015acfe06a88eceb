//! Our own binaries (`auction-server`, `auction-client`) as child processes of a test, the
//! demo or the benchmark: output to a log file, killed on drop, log tail printed when the
//! thread panics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::logfile::tail;

/// One of our own binaries run as a child process for a demo or a test: its output goes to
/// a log file in the stack's directory; it is killed on drop, and its log tail is printed
/// if the thread is panicking (a failing test shows why).
pub struct Process {
    /// Label used in messages and as the log file's name.
    pub name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Process {
    /// Starts `bin` with `args` and extra `env`, logging to `dir/NAME.log`. The child does
    /// not inherit `REDIS_SENTINELS` or an OTLP endpoint from the caller's environment.
    pub fn spawn(
        dir: &Path,
        name: &str,
        bin: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Process {
        Process::spawn_on(None, dir, name, bin, args, env)
    }

    /// Like [`Process::spawn`], inside `host`'s network namespace when one is given (see
    /// [`crate::Network`]); the program is exec'd there, so the pid is its own.
    pub fn spawn_on(
        host: Option<&crate::Host>,
        dir: &Path,
        name: &str,
        bin: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create a log file in the stack's temp dir");
        let err = out.try_clone().expect("clone a log file handle");
        let mut cmd = crate::net::command_in(host.map(|h| h.netns.as_str()), bin);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(out))
            .stderr(std::process::Stdio::from(err))
            .env("RUST_LOG", "info,auction=debug")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("REDIS_SENTINELS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e} (build it with `cargo build`)"));
        Process {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<i32> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if tokio::time::Instant::now() > until {
                anyhow::bail!("{} did not exit within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (last 80 lines) -----\n{}",
                self.name,
                tail(&self.log(), 80)
            );
        }
    }
}

/// Sends signal `sig` (`TERM`, `KILL`, `STOP`, `CONT`) to `pid` with the system's `kill`;
/// a process that is already gone is not an error here.
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Processes stopped with SIGSTOP, continued with SIGCONT when this is dropped (also when
/// the test panics).
pub struct Paused(Vec<u32>);

impl Paused {
    /// Stops `pids` now.
    pub fn stop(pids: Vec<u32>) -> Paused {
        for pid in &pids {
            signal(*pid, "STOP");
        }
        Paused(pids)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        for pid in &self.0 {
            signal(*pid, "CONT");
        }
    }
}
