//! Free loopback ports: the one picker for Redis nodes, servers under test, the demo and the
//! benchmark, so that stacks started in parallel in one process never share a port.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::Mutex;

use anyhow::{Context, bail};

/// Ports this process has already handed out. The OS may return the same
/// ephemeral port to two bind(0) probes once the first probe socket is closed;
/// remembering them rules out collisions between stacks in the same process,
/// leaving only cross-process races for the retry in `launch`.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago and that no other caller in this process
/// got. Another process may still take it before the caller binds: callers that can
/// detect that (a Redis node that fails to bind) retry with a fresh port.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context(
            "could not bind 127.0.0.1:0 to find a free port: is the loopback interface up?",
        )?;
        let port = listener
            .local_addr()
            .context("could not read the address of a probe socket on 127.0.0.1")?
            .port();
        drop(listener);
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!(
        "the OS kept returning loopback ports this process already uses; the ephemeral port range is too small"
    )
}
