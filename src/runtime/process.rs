//! The process around the library: the body both binaries' `main` share (check the
//! config or run until SIGTERM, one-line reason and exit code 2 on failure), the shutdown
//! signal, binding a configured listen address, and the host facts (name, wall clock)
//! that identify this process.

/// Binds a listener for the address configured in `setting` (e.g. `GRPC_ADDR`), with an
/// error that names the setting and the likely cause.
pub async fn listen(
    addr: std::net::SocketAddr,
    setting: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {setting} {addr}: is another process using it?"))
}

/// This machine's host name (the pod name on Kubernetes), or `"localhost"`.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Local wall-clock time in ms since the epoch (only for bounds, never for judging bids).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The body both binaries' `main` share: with `check_only`, validate and exit; otherwise
/// install telemetry, run until SIGTERM/Ctrl-C, and turn the outcome into an exit code
/// (0 ok, 2 with a one-line reason on stderr).
pub async fn main_of<F, Fut>(
    name: &'static str,
    check_only: bool,
    validate: impl FnOnce() -> anyhow::Result<()>,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let fail = |e: anyhow::Error| {
        tracing::error!("{name}: {e:#}");
        eprintln!("{name}: {e:#}");
        ExitCode::from(2)
    };
    if check_only {
        return match validate() {
            Ok(()) => {
                println!("{name}: configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let _telemetry = match crate::runtime::telemetry::init(name) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    match run(Box::pin(shutdown_signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
