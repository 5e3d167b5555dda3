//! Free TCP ports on 127.0.0.1 for processes started on one machine (`nidctl dev up`, the tests).
//!
//! A port the OS hands out for `bind(:0)` comes from the ephemeral range, the same range it draws
//! the source ports of outgoing connections from: between the moment a free port is chosen and the
//! moment the process it was chosen for binds it, any connection on the machine (replicas dialling
//! each other, a test's client) may take it, and the process then fails to start. Ports are
//! therefore drawn at random from below the ephemeral range, where the OS never assigns source
//! ports, checked free by binding them, and never handed out twice by one process.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Where the draw starts: above the well-known and most registered service ports.
const LOW: u16 = 10_000;

/// The draw's upper end when the ephemeral range cannot be read (Linux's default range starts at
/// 32768).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The first port of the OS's ephemeral range (Linux: `ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// A random 64-bit number (the standard library's per-process random hash keys, varied per call).
fn random(counter: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(counter);
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// A TCP port on 127.0.0.1 that is free now, outside the ephemeral range, and not returned before
/// by this process. Falls back to a port the OS picks (still never one returned before) if the
/// range below the ephemeral one is too small or full.
pub fn free_port() -> std::io::Result<u16> {
    let high = ephemeral_start();
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    if high > LOW + 1_000 {
        let span = u64::from(high - LOW);
        for attempt in 0..200u64 {
            let port = LOW + (random(attempt) % span) as u16;
            if handed.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no free port not handed out before"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let high = ephemeral_start();
        if high <= LOW + 1_000 {
            return; // This host's ephemeral range leaves no room below it: the fallback is used.
        }
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        for p in &ports {
            assert!((LOW..high).contains(p), "{p} outside {LOW}..{high}");
            TcpListener::bind(("127.0.0.1", *p)).expect("still free");
        }
    }
}
