//! Symmetry reduction: servers are interchangeable (nothing in the protocol depends on
//! which process is which), so states that differ only by a renaming of servers are one
//! state. Each state is replaced by the least of its renamings; with 3 servers that cuts
//! the states explored by up to 6.

use crate::redis::{Data, LockValue, Writer};
use crate::system::State;

/// The least renaming of `s`'s servers (by the derived order on states).
pub fn representative(s: &State) -> State {
    let n = s.servers.len();
    let mut best: Option<State> = None;
    for perm in permutations(n) {
        let candidate = rename(s, &perm);
        if best.as_ref().is_none_or(|b| candidate < *b) {
            best = Some(candidate);
        }
    }
    best.unwrap_or_else(|| s.clone())
}

/// Every permutation of `0..n` (`perm[old] = new`); n is at most a handful.
fn permutations(n: usize) -> Vec<Vec<u8>> {
    let mut all = vec![Vec::new()];
    for _ in 0..n {
        all = all
            .into_iter()
            .flat_map(|p: Vec<u8>| {
                let free: Vec<u8> = (0..n as u8).filter(|x| !p.contains(x)).collect();
                free.into_iter().map(move |x| {
                    let mut q = p.clone();
                    q.push(x);
                    q
                })
            })
            .collect();
    }
    all
}

fn rename(s: &State, perm: &[u8]) -> State {
    let value = |v: LockValue| LockValue {
        server: perm[v.server as usize],
        token: v.token,
    };
    let data = |d: &Data| Data {
        lock: d.lock.map(value),
        fence_writer: match d.fence_writer {
            Writer::Opener => Writer::Opener,
            Writer::Holder(v) => Writer::Holder(value(v)),
            Writer::Closer(v) => Writer::Closer(value(v)),
        },
        ..*d
    };
    let mut r = s.clone();
    r.redis.base = data(&s.redis.base);
    for (to, from) in r.redis.log.iter_mut().zip(&s.redis.log) {
        *to = data(from);
    }
    for (i, server) in s.servers.iter().enumerate() {
        let to = &mut r.servers[perm[i] as usize];
        *to = server.clone();
        to.lease = server.lease.map(value);
    }
    r
}
