//! Process plumbing shared by nid's binaries (cell, router, nidctl): waiting for a shutdown signal,
//! serving Prometheus text on a plain HTTP endpoint, recording gRPC handler outcomes, and the
//! tests' scan for plaintext at rest. Kept out of `nid-proto`, which does no I/O,
//! and free of storage dependencies, so every binary may use it.

pub mod accept_encoding;
pub mod access;
pub mod grpc_metrics;
pub mod logging;
pub mod metrics_http;
pub mod oversized;
pub mod pki;
pub mod ports;
pub mod secret;
pub mod tls;

use tokio::net::TcpListener;

/// Waits for SIGTERM or SIGINT (or Ctrl-C where Unix signals are unavailable).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The accepted connections of a gRPC listener, with Nagle's algorithm off on each. tonic's
/// `Server::tcp_nodelay` only applies to listeners tonic binds itself, not to a stream handed to
/// `serve_with_incoming`; without this, a response written in several small pieces can wait for
/// the peer's delayed ACK (about 40 ms on Linux).
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
}

/// The tokio runtime of a server binary with `threads` threads: 1 is a current-thread runtime (no
/// cross-thread wake-ups or work stealing: the least CPU per request when cores are shared), N > 1
/// a multi-threaded runtime of N workers, 0 one worker per core.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

/// The label value of a gRPC code (the names grpc-go's Prometheus middleware uses).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Searching files for plaintext: the check, used by the tests, that no identifier, personal data
/// or secret reaches disk or logs.
pub mod plaintext {
    use std::path::Path;

    /// Every file below `dir` (data, WAL, SSTs, snapshots, logs) searched for each needle: the
    /// number of files read and one line per (file, needle) found.
    pub fn scan(dir: &Path, needles: &[Vec<u8>]) -> (usize, Vec<String>) {
        let mut files = 0;
        let mut hits = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(bytes) = std::fs::read(&path) {
                    files += 1;
                    for n in needles {
                        if contains(&bytes, n) {
                            hits.push(format!(
                                "{} contains {:?}",
                                path.display(),
                                String::from_utf8_lossy(n)
                            ));
                        }
                    }
                }
            }
        }
        (files, hits)
    }

    /// Whether `needle` occurs in `bytes`. An all-digit needle (a PIN) counts only where it is not
    /// part of a longer number: RocksDB's own LOG is full of sizes and timestamps, and a short PIN
    /// once matched one of them by chance.
    pub fn contains(bytes: &[u8], needle: &[u8]) -> bool {
        if needle.is_empty() || bytes.len() < needle.len() {
            return false;
        }
        let numeric = needle.iter().all(u8::is_ascii_digit);
        (0..=bytes.len() - needle.len()).any(|at| {
            bytes[at..].starts_with(needle)
                && !(numeric
                    && (at.checked_sub(1).is_some_and(|b| bytes[b].is_ascii_digit())
                        || bytes.get(at + needle.len()).is_some_and(u8::is_ascii_digit)))
        })
    }

    #[cfg(test)]
    mod tests {
        use super::contains;

        #[test]
        fn a_numeric_needle_counts_only_standing_alone() {
            assert!(contains(b"\x08\x0886420975\x12", b"86420975"));
            assert!(contains(b"86420975", b"86420975"));
            assert!(!contains(b"size 1286420975 bytes", b"86420975"));
            assert!(!contains(b"864209751", b"86420975"));
            assert!(contains(b"xx Tlaloc123", b"Tlaloc"), "other needles match anywhere");
            assert!(!contains(b"short", b"longer needle"));
        }
    }
}
